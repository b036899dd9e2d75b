"""Tools: typed Python functions offered to the model, their JSON schemas, and the
model's tool calls parsed from the chat template's format.

A tool is a plain function with type hints and a Google-style docstring; its schema is
what ``transformers.utils.get_json_schema`` derives from them (the format chat templates
take in ``tools=``). The model calls tools the way Hermes / Qwen-style templates ask::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "12 * 7"}}
    </tool_call>

A malformed call (not JSON, an unknown tool, arguments that do not fit) becomes an error
observation for the model, never an exception in the run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gym_core.base.errors import GymError

TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def tool_schema(fn: Callable) -> dict:
    """The JSON schema of ``fn`` ({"type": "function", "function": {...}}) from its
    signature and docstring; a :class:`GymError` naming the tool when they do not give
    one (a missing type hint or argument description). A callable whose schema comes
    from elsewhere (an MCP server's tool, wrapped by an adapter) carries it as
    ``fn.__tool_schema__``, which is returned as it is."""
    from transformers.utils import get_json_schema

    given = getattr(fn, "__tool_schema__", None)
    if given is not None:
        return given
    try:
        return get_json_schema(fn)
    except Exception as exc:  # TypeHintParsingException, DocstringParsingException
        name = getattr(fn, "__name__", repr(fn))
        raise GymError(f"tool {name!r}: no JSON schema can be derived from its signature and "
                       f"docstring ({exc}); give every argument a type hint and an 'Args:' "
                       "line") from None


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class Action:
    """What ``Environment.step`` receives after a model turn."""

    text: str  # the turn decoded (special tokens dropped), for the environment to read
    token_ids: list[int]  # the tokens the model sampled this turn (what is trained on)
    tool_calls: list[ToolCall] = field(default_factory=list)
    # the parse error of a malformed call (one line), None when every call parsed
    error: str | None = None
    finished: bool = True  # False: the turn was cut by the episode's token budget

    @property
    def content(self) -> str:
        """The turn's text without its tool calls."""
        return TOOL_CALL.sub("", self.text).strip()


def parse_tool_calls(text: str) -> tuple[list[ToolCall], str | None]:
    """The tool calls in a model turn and, when one is malformed, a one-line error for
    the model (the calls that parsed are still returned)."""
    calls, errors = [], []
    for raw in TOOL_CALL.findall(text):
        raw = raw.strip()
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            errors.append(f"the tool call is not valid JSON ({exc.msg} at character "
                          f"{exc.pos}): {raw[:80]!r}")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            errors.append(f'a tool call must be {{"name": ..., "arguments": {{...}}}}, got '
                          f"{raw[:80]!r}")
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            with contextlib.suppress(json.JSONDecodeError):
                args = json.loads(args)
        if not isinstance(args, dict):
            errors.append(f"the arguments of tool {obj['name']!r} must be a JSON object, got "
                          f"{json.dumps(args)[:80]}")
            continue
        calls.append(ToolCall(obj["name"], args))
    return calls, ("; ".join(errors) if errors else None)


_pool: concurrent.futures.ThreadPoolExecutor | None = None


def call_tool(tools: dict[str, Callable], call: ToolCall, timeout: float) -> str:
    """Run one call and return what the model sees: the result as text, or a line
    starting with ``error:`` (unknown tool, bad arguments, an exception, a timeout).
    A tool that hangs is abandoned after ``timeout`` seconds (its thread cannot be
    killed: tools that may hang forever, such as user code, run in a process, as the
    Python sandbox does)."""
    global _pool
    fn = tools.get(call.name)
    if fn is None:
        return f"error: no tool named {call.name!r}; the tools are: {', '.join(sorted(tools))}"
    params = tool_schema(fn)["function"]["parameters"]
    props = params.get("properties", {})
    unknown = sorted(set(call.arguments) - set(props))
    missing = sorted(set(params.get("required", [])) - set(call.arguments))
    if unknown or missing:
        return (f"error: tool {call.name!r} takes arguments {sorted(props)}"
                + (f"; unknown: {unknown}" if unknown else "")
                + (f"; missing: {missing}" if missing else ""))
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(max_workers=8,
                                                      thread_name_prefix="gym-tool")
    future = _pool.submit(fn, **call.arguments)
    try:
        out = future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        return f"error: tool {call.name!r} did not finish within {timeout:g} s"
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"
    return out if isinstance(out, str) else json.dumps(out, default=str)
