"""OpenAI tool calling on gym_core.serve (docs/agents.md, "Serving"), with the official
``openai`` client on the tiny model: tools, tool turns and ``tool_choice`` render as
training renders them (the prompt's token count), bad requests get OpenAI errors, and a
reply holding a call becomes ``tool_calls``."""

from __future__ import annotations

import json

import openai
import pytest

from gym_core.env.chat import render
from gym_core.env.tools import tool_schema
from tests.serve_helpers import ServerProcess

CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(["--base", "tiny"],
                        cwd=tmp_path_factory.mktemp("cwd"))
    assert srv.url, srv.output
    yield srv
    assert srv.stop() == 0, srv.output


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


TOOLS = [tool_schema(add)]


def test_a_reply_with_a_call_becomes_tool_calls():
    from gym_core.serve.tools import tool_message

    message, finish = tool_message("Let me add.\n" + CALL, "stop", True)
    assert finish == "tool_calls" and message["content"] == "Let me add."
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "add"
    assert json.loads(call["function"]["arguments"]) == {"a": 2, "b": 3}
    # without tools in the request, or without a call, the text stays the content
    assert tool_message(CALL, "stop", False) == ({"role": "assistant", "content": CALL}, "stop")
    assert tool_message("5", "length", True) == ({"role": "assistant", "content": "5"}, "length")


def test_tool_turns_render_as_in_training(client):
    from gym_core.model.policy import tiny_tokenizer

    tok = tiny_tokenizer()
    history = [*QUESTION,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS,
                                       temperature=0, max_tokens=4)
    local = [*QUESTION,
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "add",
                                                   "arguments": '{"a": 2, "b": 3}'}}]},
             {"role": "tool", "content": "5"}]
    expected = render(tok, local, TOOLS, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok(expected, add_special_tokens=False).input_ids)


def test_tool_choice(client):
    from gym_core.model.policy import tiny_tokenizer

    tok = tiny_tokenizer()
    r = client.chat.completions.create(model="tiny", messages=QUESTION, tools=TOOLS,
                                       tool_choice="none", temperature=0, max_tokens=4)
    plain = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok(plain, add_special_tokens=False).input_ids)
    assert r.choices[0].message.tool_calls is None
    # a named function: the prompt ends with the start of its call
    forced = '<tool_call>\n{"name": "add", "arguments": '
    r = client.chat.completions.create(
        model="tiny", messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=4,
        tool_choice={"type": "function", "function": {"name": "add"}})
    with_tools = render(tok, QUESTION, TOOLS, add_generation_prompt=True) + forced
    assert r.usage.prompt_tokens == len(tok(with_tools, add_special_tokens=False).input_ids)
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(
            model="tiny", messages=QUESTION, tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "mul"}})
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.chat.completions.create(model="tiny", messages=QUESTION, tools=TOOLS,
                                       stream=True)


def test_a_served_model_calls_a_tool_end_to_end(client):
    """The agent loop with the official client: a named tool_choice makes the tiny model
    call ``add`` (its arguments decoded to the tool's parameter schema), the client runs
    the tool and sends the result back, and the model answers after it."""
    from gym_core.model.policy import tiny_tokenizer

    # the client's schema bounds the integers (a random model never ends a free one)
    bounded = json.loads(json.dumps(TOOLS))
    for prop in bounded[0]["function"]["parameters"]["properties"].values():
        prop.update(minimum=0, maximum=99)
    r = client.chat.completions.create(
        model="tiny", messages=QUESTION, tools=bounded, temperature=0, max_tokens=48,
        tool_choice={"type": "function", "function": {"name": "add"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "add"
    args = json.loads(call.function.arguments)
    assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
    result = add(**args)  # the client executes the tool
    followup = [*QUESTION,
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": str(result)}]
    r2 = client.chat.completions.create(model="tiny", messages=followup, tools=TOOLS,
                                        tool_choice="none", temperature=0, max_tokens=4)
    assert r2.choices[0].finish_reason in ("stop", "length")
    # the tool's result reached the model: the prompt is the trace rendered as training
    # renders it (tool_choice="none": no tool schemas in it)
    tok = tiny_tokenizer()
    trace = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": args}}]},
        {"role": "tool", "content": str(result)}]
    want = render(tok, trace, None, add_generation_prompt=True)
    assert r2.usage.prompt_tokens == len(tok(want, add_special_tokens=False).input_ids)


def test_tool_choice_required_makes_a_call_of_one_of_the_tools(client):
    """tool_choice="required": the reply is a call of one of the tools, its name and
    arguments decoded to their schemas."""
    tools = json.loads(json.dumps(TOOLS))  # short schemas: the tiny model's context is 1024
    tools[0]["function"].pop("description")
    for prop in tools[0]["function"]["parameters"]["properties"].values():
        prop.pop("description")
        prop.update(minimum=0, maximum=99)
    mul = json.loads(json.dumps(tools[0]))
    mul["function"]["name"] = "mul"
    r = client.chat.completions.create(model="tiny", messages=QUESTION, tools=[*tools, mul],
                                       tool_choice="required", temperature=0, max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name in ("add", "mul")
    args = json.loads(call.function.arguments)
    assert set(args) == {"a", "b"} and all(0 <= v <= 99 for v in args.values())
