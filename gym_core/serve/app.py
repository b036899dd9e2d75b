"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions (streamed as
server-sent events with ``stream: true``), the model list, a health check, and the admin
routes that add and remove variants while the server runs (docs/serve.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gym_core.base.errors import GymError
from gym_core.serve.engine import Engine, Event, Params
from gym_core.serve.engine import Request as EngineRequest
from gym_core.serve.variants import Base, Registry, Variant, confine, load_variant

log = logging.getLogger("gym.serve")


@dataclass
class Server:
    """Everything the routes use."""

    engine: Engine
    registry: Registry
    base: Base
    tokenizer: Any
    base_name: str
    plugins: Any = None
    api_key: str | None = None
    # POST /v1/variants loads only from inside these folders (--variant-dirs)
    variant_dirs: list[Path] = field(default_factory=lambda: [Path("runs")])
    max_body_bytes: int = 4 * 2**20  # larger request bodies get 413, unread
    created: int = field(default_factory=lambda: int(time.time()))
    # one variant loads at a time: loading is CPU-heavy and checks the name is free
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {401: "authentication_error", 404: "invalid_request_error",
                              500: "server_error"}.get(status, "invalid_request_error")

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


# ----------------------------------------------------------------------------------------
# request bodies (OpenAI's names; unknown fields are ignored, as OpenAI's API does)
# ----------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result's call


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever comes


class JsonSchemaSpec(_Body):
    name: str = "response"
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # OpenAI's structured output, enforced by constrained decoding
    # (gym_core.sampling.structured)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None  # OpenAI function tools (docs/agents.md)
    tool_choice: str | dict | None = None


def _call_grammar(body) -> tuple[str, str]:
    """(the grammar, the text that closes the call) of a forced tool call: a named
    function's arguments follow its ``parameters`` JSON schema; ``required`` makes the
    whole call one of the tools' ``{"name": ..., "arguments": ...}`` objects."""
    from gym_core.base.errors import GymError
    from gym_core.sampling import structured

    fns = [t.get("function") or {} for t in body.tools or []]
    if isinstance(body.tool_choice, dict):
        name = (body.tool_choice.get("function") or {}).get("name")
        schema = next(f for f in fns if f.get("name") == name).get("parameters") \
            or structured.ANY_OBJECT
        close = "}\n</tool_call>"
    else:
        schema = {"anyOf": [
            {"type": "object", "properties": {
                "name": {"const": f.get("name")},
                "arguments": f.get("parameters") or structured.ANY_OBJECT},
             "required": ["name", "arguments"], "additionalProperties": False}
            for f in fns]}
        close = "\n</tool_call>"
    try:
        return structured.grammar(schema), close
    except GymError as exc:
        raise APIError(400, f"the tools' parameters: {exc}", param="tools") from None


def _response_grammar(fmt: ResponseFormat | None) -> str | None:
    """The grammar of ``response_format`` (None: free text); a schema that cannot be
    compiled is a 400 naming it."""
    if fmt is None or fmt.type == "text":
        return None
    from gym_core.base.errors import GymError
    from gym_core.sampling import structured

    if fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
        raise APIError(400, "response_format json_schema needs json_schema.schema",
                       param="response_format")
    schema = structured.ANY_OBJECT if fmt.type == "json_object" else fmt.json_schema.schema_
    try:
        return structured.grammar(schema)
    except GymError as exc:
        raise APIError(400, str(exc), param="response_format") from None


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None


class VariantBody(_Body):
    name: str
    path: str
    replace: bool = False


# ----------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="gym serve", version="1", docs_url="/docs", redoc_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
        elif not loc:
            message = ("the request body must be a JSON object (and the request's "
                       "Content-Type application/json)")
        else:
            where = ".".join(loc) or "body"
            message = f"{where}: {first.get('msg', 'invalid value')}"
        return APIError(400, message, param=".".join(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    app.add_middleware(Guard, server=server)

    @app.get("/health")
    async def health():
        return {"status": "ok", "base": server.base_name,
                "variants": len(server.registry.names()), **server.engine.load()}

    from gym_core.model.policy import describe
    from gym_core.model.stages import base_identity, identity_digest

    # which base model every listed model sits on (variants are checked against it when
    # they load): what gym_core.eval compares with the base it is configured for
    identity = base_identity(server.base.model_cfg)
    base_card = {"name": describe(server.base.model_cfg), "identity": identity,
                 "digest": identity_digest(identity)}

    def model_card(name: str, variant: Variant | None) -> dict:
        return {"id": name, "object": "model", "owned_by": "gym",
                "created": variant.created if variant else server.created,
                "root": server.base_name, "parent": server.base_name if variant else None,
                "max_model_len": server.engine.max_len, "base": base_card}

    @app.get("/v1/models")
    async def models():
        data = [model_card(server.base_name, None)]
        data += [model_card(v.name, v) for v in server.registry.all()]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name == server.base_name:
            return model_card(name, None)
        variant = server.registry.get(name)
        if variant is None:
            raise _unknown_model(name)
        return model_card(name, variant)

    @app.get("/v1/variants")
    async def variants():
        return {"object": "list", "data": [v.describe() for v in server.registry.all()]}

    @app.post("/v1/variants", status_code=201)
    async def add_variant(body: VariantBody):
        async with server.load_lock:
            if not body.replace and (body.name == server.base_name or server.registry.get(body.name)):
                raise APIError(409, f"a model named '{body.name}' is already being served "
                               "(send \"replace\": true to load it again)", param="name",
                               code="variant_exists")
            path = confine(body.path, server.variant_dirs)
            if path is None:  # the same answer whether or not the path exists
                raise APIError(403, "the server loads variants only from inside the folders "
                               "named at its start (--variant-dirs); this path is not in one",
                               param="path", code="path_not_allowed")
            try:
                variant = await run_in_threadpool(load_variant, body.name, path,
                                                  server.base, server.plugins)
                server.registry.add(variant, replace=body.replace)
            except GymError as exc:
                raise APIError(400, str(exc), param="path", code="invalid_variant") from None
        log.info("variant %s added (%s, %d bytes)", variant.name, variant.kind, variant.nbytes)
        return variant.describe()

    @app.delete("/v1/variants/{name:path}")
    async def remove_variant(name: str):
        if server.registry.remove(name) is None:
            raise APIError(404, f"no variant named '{name}' is being served", param="name",
                           code="model_not_found")
        log.info("variant %s removed", name)
        return {"id": name, "object": "variant", "deleted": True}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        variant = _resolve(server, body.model)
        if body.tools or any(m.role == "tool" or m.tool_calls for m in body.messages):
            from gym_core.serve.tools import tool_prompt

            if body.stream:
                raise APIError(400, "stream is not supported with tools", param="stream")

            def tokenize_tools():  # off the event loop, like any prompt
                text, forced = tool_prompt(server.tokenizer, body)
                return server.tokenizer(text, add_special_tokens=False).input_ids, forced

            ids, forced = await run_in_threadpool(tokenize_tools)
            max_tokens = body.max_completion_tokens or body.max_tokens
            grammar, close = _response_grammar(body.response_format), ""
            if grammar is None and (isinstance(body.tool_choice, dict)
                                    or body.tool_choice == "required"):
                # the call decoded to the tools' JSON schemas (constrained decoding, as
                # response_format) and closed by the server
                grammar, close = _call_grammar(body)
            return await _complete(server, request, body, variant, [ids], max_tokens,
                                   chat=True, grammar=grammar,
                                   tools=(bool(body.tools), forced, close))
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str)
                     else "".join(p.text for p in m.content or [])} for m in body.messages]

        def tokenize():  # off the event loop: a long prompt must not stall other requests
            try:
                text = server.tokenizer.apply_chat_template(messages, tokenize=False,
                                                            add_generation_prompt=True)
            except Exception as exc:  # a template that refuses these messages
                raise APIError(400, f"the chat template rejected the messages: {exc}",
                               param="messages") from None
            return server.tokenizer(text, add_special_tokens=False).input_ids

        ids = await run_in_threadpool(tokenize)
        max_tokens = body.max_completion_tokens or body.max_tokens
        grammar = _response_grammar(body.response_format)
        return await _complete(server, request, body, variant, [ids], max_tokens, chat=True,
                               grammar=grammar)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        variant = _resolve(server, body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        p = body.prompt
        if isinstance(p, str) or p and isinstance(p[0], int):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        vocab = len(server.tokenizer)

        def tokenize():  # off the event loop, like the chat route's
            ids = []
            for one in prompts:
                if isinstance(one, str):
                    ids.append(server.tokenizer(one, add_special_tokens=False).input_ids)
                else:
                    if any(t < 0 or t >= vocab for t in one):
                        raise APIError(400, f"prompt token ids must be in [0, {vocab})",
                                       param="prompt")
                    ids.append(list(one))
            return ids

        ids = await run_in_threadpool(tokenize)
        return await _complete(server, request, body, variant, ids, body.max_tokens, chat=False)

    return app


class Guard:
    """ASGI middleware in front of every route (HTTP and websocket alike): the API key on
    ``/v1``, ``/docs`` and ``/openapi.json`` when the server has one, and the request
    body's size (a larger body is refused with 413 before it is read in full)."""

    PROTECTED = ("/v1", "/docs", "/openapi.json", "/redoc")

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        server = self.server
        path = scope.get("path", "")
        if server.api_key and path.startswith(self.PROTECTED):
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {server.api_key}".encode()):
                return await _send(send, APIError(
                    401, "missing or wrong API key (send 'Authorization: Bearer KEY', the key "
                    "given to --api-key)", code="invalid_api_key"), scope)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = server.max_body_bytes
        too_big = APIError(413, f"the request body is larger than the server's limit of "
                           f"{limit} bytes (--max-body-bytes)", code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send(send, too_big, scope)
        # read the body here, up to the limit (a body sent without its length is counted)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was complete
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return await _send(send, too_big, scope)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the disconnect, when the client leaves

        await self.app(scope, replay, send)


async def _send(send, error: APIError, scope) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return

    async def nothing():
        return {"type": "http.disconnect"}

    await error.response()(scope, nothing, send)


def _unknown_model(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param="model",
                    code="model_not_found")


def _resolve(server: Server, name: str) -> Variant | None:
    if name == server.base_name:
        return None
    variant = server.registry.get(name)
    if variant is None:
        raise _unknown_model(name)
    return variant


def _check(server: Server, body: _Sampling, prompts: list[list[int]], max_tokens: int | None):
    """Validate what pydantic cannot; return the engine's parameters per prompt."""
    if body.presence_penalty or body.frequency_penalty:
        which = "presence_penalty" if body.presence_penalty else "frequency_penalty"
        raise APIError(400, f"{which} is not supported (only 0)", param=which)
    if body.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
    limit = server.engine.max_len
    params = []
    for ids in prompts:
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) >= limit or (max_tokens and len(ids) + max_tokens > limit):
            asked = len(ids) + (max_tokens or 0)
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {asked} tokens ({len(ids)} in the prompt, {max_tokens or 0} in the "
                "completion). Please reduce the length of the prompt or completion.",
                param="messages" if hasattr(body, "messages") else "prompt",
                code="context_length_exceeded")
        params.append(Params(max_tokens=max_tokens or limit - len(ids),
                             temperature=1.0 if body.temperature is None else body.temperature,
                             top_p=1.0 if body.top_p is None else body.top_p,
                             seed=body.seed, stop=stop, ignore_eos=body.ignore_eos))
    return params


async def _complete(server: Server, http: Request, body: _Sampling, variant, prompts,
                    max_tokens, *, chat: bool, grammar: str | None = None,
                    tools: tuple[bool, str, str] | None = None):
    params = _check(server, body, prompts, max_tokens)
    for prm in params:
        prm.grammar = grammar
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    reqs: list[EngineRequest] = []

    def emitter(index: int):
        def emit(ev: Event) -> None:
            # RuntimeError: the event loop is gone (the server is shutting down)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, (index, ev))
        return emit

    for p, (ids, prm) in enumerate(zip(prompts, params)):
        for k in range(body.n):
            seeded = Params(**{**prm.__dict__, "seed": None if prm.seed is None else prm.seed + k})
            reqs.append(EngineRequest(ids, variant, seeded, emitter(p * body.n + k)))
    for r in reqs:
        server.engine.submit(r)

    prefix = "chatcmpl" if chat else "cmpl"
    rid = f"{prefix}-{secrets.token_hex(12)}"
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(reqs, queue, rid, created, body.model, kind, chat, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    texts = [""] * len(reqs)
    finals: dict[int, Event] = {}
    left = object()

    async def watch() -> None:
        # a client that leaves frees its rows at once, not at the next poll: the
        # request's receive() returns http.disconnect when the connection closes
        while (await http.receive())["type"] != "http.disconnect":
            pass
        for r in reqs:
            r.cancel()
        queue.put_nowait((None, left))

    watcher = asyncio.create_task(watch())
    try:
        while len(finals) < len(reqs):
            index, ev = await queue.get()
            if ev is left:
                return JSONResponse(status_code=499, content={})
            if ev.kind == "text":
                texts[index] += ev.text
            elif ev.kind == "error":
                raise APIError(500, ev.text)
            else:
                finals[index] = ev
    finally:
        watcher.cancel()
        for r in reqs:
            r.cancel()  # no-op for finished ones
    choices = []
    for i, text in enumerate(texts):
        fin = finals[i].finish_reason
        if chat and tools is not None:  # tool calls parsed out (gym_core/serve/tools.py)
            from gym_core.serve.tools import tool_message

            # the forced start of a call, the reply, and the close a named call gets
            # (only once its arguments are complete: a reply cut by max_tokens stays text)
            close = tools[2] if fin == "stop" else ""
            message, fin = tool_message(tools[1] + text + close, fin, tools[0])
            choices.append({"index": i, "message": message, "finish_reason": fin,
                            "logprobs": None})
        elif chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "finish_reason": fin, "logprobs": None})
        else:
            choices.append({"index": i, "text": text, "finish_reason": fin, "logprobs": None})
    return {"id": rid, "object": kind, "created": created, "model": body.model,
            "choices": choices, "usage": _usage(prompts, body.n, finals.values())}


def _usage(prompts, n, finals) -> dict:
    prompt = sum(len(p) for p in prompts) * n
    completion = sum(ev.completion_tokens for ev in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def _stream(reqs, queue, rid, created, model, kind, chat, include_usage):
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def sse(choices, usage=None) -> str:
        data = {"id": rid, "object": chunk_kind, "created": created, "model": model,
                "choices": choices}
        if include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    def choice(i, text=None, finish=None, role=False):
        if chat:
            delta = {"role": "assistant", "content": ""} if role else \
                ({"content": text} if text is not None else {})
            return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}

    finals: dict[int, Event] = {}
    try:
        if chat:
            yield sse([choice(i, role=True) for i in range(len(reqs))])
        while len(finals) < len(reqs):
            index, ev = await queue.get()
            if ev.kind == "text":
                yield sse([choice(index, ev.text)])
            elif ev.kind == "error":
                err = {"error": {"message": ev.text, "type": "server_error", "param": None,
                                 "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                return
            else:
                finals[index] = ev
                yield sse([choice(index, None if chat else "", ev.finish_reason)])
        if include_usage:
            prompts = [r.prompt_ids for r in reqs]
            yield sse([], _usage(prompts, 1, finals.values()))
        yield "data: [DONE]\n\n"
    finally:
        for r in reqs:  # the client left mid-stream, or we are done: free the rows
            r.cancel()
