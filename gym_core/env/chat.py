"""Rendering tool-using conversations with the model's chat template.

A template that renders ``tools=`` (Qwen2.5, Llama 3.1, Hermes...) is used as it is.
A template that ignores them (SmolLM2's plain ChatML, the tiny test model's) gets the
Hermes / Qwen2.5 convention written into the messages first: the tool schemas in the
system message, an assistant's ``tool_calls`` as ``<tool_call>{json}</tool_call>`` in
its content, a ``tool`` message as a user turn in ``<tool_response>`` tags. Episodes
(the rollout engine) and tool-use traces (SFT) render through the same function, so
SFT -> RL sees one format.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

_native: dict[int, bool] = {}


def renders_tools(tokenizer) -> bool:
    """True when the tokenizer's chat template writes ``tools=`` into the prompt."""
    key = id(tokenizer)
    if key not in _native:
        probe = [{"role": "user", "content": "hi"}]
        schema = {"type": "function", "function": {
            "name": "probe_tool_xyz", "description": "d",
            "parameters": {"type": "object", "properties": {}}}}
        try:
            with_tools = tokenizer.apply_chat_template(probe, tools=[schema], tokenize=False)
        except Exception:
            with_tools = ""
        _native[key] = "probe_tool_xyz" in with_tools
    return _native[key]


def format_call(call: dict) -> str:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        with contextlib.suppress(json.JSONDecodeError):
            args = json.loads(args)
    return "<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": args}) + "\n</tool_call>"


def hermes_messages(messages: list[dict], schemas: list[dict] | None) -> list[dict]:
    """``messages`` with tools, tool calls and tool results written as text (the
    convention above), for templates that do not render them."""
    out: list[dict] = []
    if schemas:
        block = TOOLS_HEADER + "\n".join(json.dumps(s) for s in schemas) + TOOLS_FOOTER
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + block})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    pending: list[str] = []
    for m in messages:
        role = m["role"]
        if role == "tool":
            pending.append(f"<tool_response>\n{m.get('content', '')}\n</tool_response>")
            continue
        if pending:  # consecutive tool results form one user turn, as Qwen2.5 renders them
            out.append({"role": "user", "content": "\n".join(pending)})
            pending = []
        content = m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(format_call(c) for c in m["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        out.append({"role": role, "content": content})
    if pending:
        out.append({"role": "user", "content": "\n".join(pending)})
    return out


def render(tokenizer, messages: list[dict], schemas: list[dict] | None = None, *,
           add_generation_prompt: bool = False) -> str:
    """The conversation as the model sees it, with the tools' schemas."""
    if renders_tools(tokenizer):
        kwargs: dict[str, Any] = {"tools": schemas} if schemas else {}
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    return tokenizer.apply_chat_template(hermes_messages(messages, schemas), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _has_tool_turns(messages: list[dict]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def continuation(tokenizer, history: list[dict], new: list[dict],
                 schemas: list[dict] | None) -> str:
    """The text to append after a model turn that ended with its end-of-turn token, so
    that the context reads as ``history + new`` rendered with a generation prompt: what
    the template writes after the end-of-turn token (ChatML's newline), then ``new``'s
    turns and the next assistant header. ``history`` ends with the assistant's turn."""
    base = render(tokenizer, history, schemas)
    full = render(tokenizer, history + new, schemas, add_generation_prompt=True)
    if not full.startswith(base):
        from gym_core.base.errors import GymError

        raise GymError("the chat template renders a conversation's earlier turns differently "
                       "once later turns follow; multi-turn episodes cannot be extended "
                       "token by token with it")
    eos = tokenizer.eos_token or ""
    cut = base.rfind(eos) if eos else -1
    tail = base[cut + len(eos):] if cut >= 0 else ""
    return tail + full[len(base):]


def trace_segments(tokenizer, messages: list[dict], tools: list[dict] | None = None
                   ) -> list[tuple[str, bool]]:
    """A tool-use trace (``messages`` with assistant ``tool_calls`` and ``tool`` turns,
    TRL's ``tools`` column as schemas) as ``(text, trained)`` segments: the assistant
    turns trained (their content, tool calls and end-of-turn token), everything else
    (system, user, tool results, the assistant headers) not. The segments concatenate to
    the whole rendering; each assistant turn is cut where rendering the conversation up
    to it with a generation prompt ends."""
    from gym_core.base.errors import GymError

    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], tools, add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], tools)
        if not before.startswith(done) or not upto.startswith(before):
            raise GymError("the chat template renders a conversation's earlier turns "
                           "differently once later turns follow, so its assistant turns "
                           "cannot be told apart turn by turn")
        if len(before) > len(done):
            pieces.append((before[len(done):], False))
        # the turn itself: up to and including its end-of-turn token; what the template
        # writes after it (ChatML's newline) belongs to the next segment
        turn = upto[len(before):]
        eos = tokenizer.eos_token or ""
        cut = turn.rfind(eos)
        end = cut + len(eos) if eos and cut >= 0 else len(turn)
        pieces.append((turn[:end], True))
        done = before + turn[:end]
    whole = render(tokenizer, messages, tools)
    if not whole.startswith(done):
        raise GymError("the chat template renders a conversation's earlier turns differently "
                       "once later turns follow")
    if len(whole) > len(done):
        pieces.append((whole[len(done):], False))
    return pieces
