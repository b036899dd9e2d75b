"""OpenAI tool calling on gym_core.serve (docs/agents.md, "Serving"), with the official
``openai`` client: a tiny model's LoRA variant trained here to answer a tool-offering
prompt with one call, served; the call comes back as ``tool_calls``; tool turns and
``tool_choice`` render as training renders them."""

from __future__ import annotations

import json

import openai
import pytest
import torch

from gym_core.env.chat import render
from gym_core.env.tools import tool_schema
from tests.serve_helpers import ServerProcess, make_run, model_cfg

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
def runs(tmp_path_factory):
    """runs/caller: a LoRA adapter on the tiny model that answers QUESTION with CALL
    (memorised: a few hundred Adam steps on the one sequence), checked greedy here."""
    from peft import LoraConfig, get_peft_model

    from gym_core.config.schema import ALL_LINEAR
    from gym_core.model.policy import load_base
    from gym_core.sampling.generation import Sampling, generate

    root = tmp_path_factory.mktemp("serve-tools") / "runs"
    run = make_run(root, "caller", "lora", 1)
    base, tok = load_base(model_cfg())
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR))
    prompt = tok(render(tok, QUESTION, [tool_schema(add)], add_generation_prompt=True),
                 add_special_tokens=False).input_ids
    target = tok(CALL, add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = torch.tensor([prompt + target])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(400):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 1e-3:
            break
    model.eval()
    out = generate(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
                   num_samples=1, max_new_tokens=len(target) + 2,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   sampling=Sampling(do_sample=False))[0].tolist()
    assert out[:len(target)] == target, "the variant did not learn the call"
    model.save_pretrained(run / "final")
    return root


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    srv = ServerProcess(["--base", "tiny", "--variants", str(runs)],
                        cwd=tmp_path_factory.mktemp("cwd"))
    assert srv.url, srv.output
    yield srv
    assert srv.stop() == 0, srv.output


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


TOOLS = [tool_schema(add)]


def test_the_models_call_comes_back_as_tool_calls(client):
    r = client.chat.completions.create(model="caller", messages=QUESTION, tools=TOOLS,
                                       temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "add"
    assert json.loads(call.function.arguments) == {"a": 2, "b": 3}


def test_tool_turns_render_as_in_training(client):
    from gym_core.model.policy import tiny_tokenizer

    tok = tiny_tokenizer()
    history = [*QUESTION,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = client.chat.completions.create(model="caller", messages=history, tools=TOOLS,
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
    r = client.chat.completions.create(model="caller", messages=QUESTION, tools=TOOLS,
                                       tool_choice="none", temperature=0, max_tokens=4)
    plain = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok(plain, add_special_tokens=False).input_ids)
    assert r.choices[0].message.tool_calls is None
    # a named function: the reply starts with its call
    r = client.chat.completions.create(
        model="caller", messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=40,
        tool_choice={"type": "function", "function": {"name": "add"}})
    assert r.choices[0].message.tool_calls[0].function.name == "add"
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(
            model="caller", messages=QUESTION, tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "mul"}})
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.chat.completions.create(model="caller", messages=QUESTION, tools=TOOLS,
                                       stream=True)
