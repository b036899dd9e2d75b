"""OpenAI tool calling for ``/v1/chat/completions`` (docs/agents.md, "Serving"): the
request's ``tools`` rendered with the model's chat template (gym_core.env.chat: the
template's own tool format, or the Hermes / Qwen convention for templates without one),
``tool_choice`` applied, and the model's ``<tool_call>`` blocks returned as OpenAI
``tool_calls``."""

from __future__ import annotations

import json
import secrets
from typing import Any

from gym_core.env.chat import render
from gym_core.env.tools import TOOL_CALL, parse_tool_calls


def request_messages(body) -> list[dict[str, Any]]:
    """The request's messages as chat-template messages (assistant ``tool_calls`` and
    ``tool`` turns kept)."""
    out = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) or m.content is None \
            else "".join(p.text for p in m.content)
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": content or ""}
        if m.tool_calls:
            msg["tool_calls"] = [{"type": "function", "id": c.get("id"),
                                  "function": c.get("function", {})} for c in m.tool_calls]
        out.append(msg)
    return out


def tool_prompt(tokenizer, body) -> tuple[str, str]:
    """(the prompt text, the text forced at the start of the reply). ``tool_choice``:
    "none" renders no tools; "auto" (the default with tools) lets the model choose;
    "required" starts the reply with ``<tool_call>``; a named function starts it with
    that function's call."""
    from gym_core.serve.app import APIError

    messages = request_messages(body)
    schemas = body.tools or None
    choice = body.tool_choice if body.tool_choice is not None else "auto"
    forced = ""
    if choice == "none":
        schemas = None
    elif choice == "required":
        forced = "<tool_call>\n"
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        names = [(t.get("function") or {}).get("name") for t in body.tools or []]
        if name not in names:
            raise APIError(400, f"tool_choice names function {name!r}, which is not in tools "
                           f"({', '.join(map(str, names)) or 'none'})", param="tool_choice")
        forced = '<tool_call>\n{"name": ' + json.dumps(name) + ', "arguments": '
    elif choice != "auto":
        raise APIError(400, f"tool_choice={choice!r} is not none, auto, required or a "
                       "function", param="tool_choice")
    if forced and not schemas:
        raise APIError(400, f"tool_choice={choice!r} needs tools", param="tool_choice")
    try:
        text = render(tokenizer, messages, schemas, add_generation_prompt=True)
    except Exception as exc:  # a template that refuses these messages
        raise APIError(400, f"the chat template rejected the messages: {exc}",
                       param="messages") from None
    return text + forced, forced


def tool_message(text: str, finish: str, with_tools: bool) -> tuple[dict, str]:
    """The assistant message for a reply (tool calls parsed out) and its finish reason:
    ``tool_calls`` when the reply called a tool."""
    if not with_tools:
        return {"role": "assistant", "content": text}, finish
    calls, _ = parse_tool_calls(text)
    if not calls:
        return {"role": "assistant", "content": text}, finish
    content = TOOL_CALL.sub("", text).strip() or None
    return {"role": "assistant", "content": content, "tool_calls": [
        {"id": f"call_{secrets.token_hex(12)}", "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
        for c in calls]}, "tool_calls"
