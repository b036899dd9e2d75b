"""The Playground's and Variants page's client of ``python -m gym_core.serve``: its
OpenAI-compatible routes (models, chat completions streamed as server-sent events) and
its admin routes (/v1/variants). Every failure becomes a :class:`ServeError` with the
server's own one-line message (OpenAI's ``{"error": {"message"}}``), so the page can show
it and carry on."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from gym_core.base.errors import GymError


class ServeError(GymError):
    """The server refused a request (or could not be reached)."""


class ServeClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout

    def _client(self) -> httpx.AsyncClient:
        # trust_env=False: a proxy set in the environment must not see local traffic
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, trust_env=False,
                                 timeout=httpx.Timeout(self.timeout, connect=5.0))

    async def _json(self, method: str, path: str, **kw) -> Any:
        try:
            async with self._client() as c:
                r = await c.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ServeError(f"cannot reach the server at {self.url} ({_why(exc)}): start it "
                             "with python -m gym_core.serve, or give its address") from None
        if r.status_code >= 400:
            raise ServeError(_message(r.status_code, r.content))
        return r.json()

    async def models(self) -> list[str]:
        """The base model first, then every variant."""
        return [m["id"] for m in (await self._json("GET", "/v1/models"))["data"]]

    async def variants(self) -> list[dict[str, Any]]:
        return (await self._json("GET", "/v1/variants"))["data"]

    async def add_variant(self, name: str, path: str, replace: bool = False) -> dict[str, Any]:
        return await self._json("POST", "/v1/variants",
                                json={"name": name, "path": path, "replace": replace})

    async def remove_variant(self, name: str) -> dict[str, Any]:
        return await self._json("DELETE", f"/v1/variants/{name}")

    async def chat(self, model: str, messages: list[dict[str, str]], **params) -> str:
        """The whole answer of one (non-streamed) chat completion."""
        body = {"model": model, "messages": messages, **params}
        data = await self._json("POST", "/v1/chat/completions", json=body)
        return data["choices"][0]["message"]["content"]

    async def stream_chat(self, model: str, messages: list[dict[str, str]],
                          **params) -> AsyncIterator[str]:
        """The answer's text as the server streams it (one piece per event)."""
        body = {"model": model, "messages": messages, "stream": True, **params}
        try:
            async with self._client() as c, c.stream("POST", "/v1/chat/completions",
                                                     json=body) as r:
                if r.status_code >= 400:
                    raise ServeError(_message(r.status_code, await r.aread()))
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise ServeError(event["error"].get("message") or str(event["error"]))
                    for choice in event.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            yield piece
        except httpx.HTTPError as exc:
            raise ServeError(f"the server at {self.url} did not answer ({_why(exc)})") from None


def _message(status: int, content: bytes) -> str:
    try:
        err = json.loads(content)["error"]
        return err["message"] if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        text = content.decode("utf-8", "replace").strip().splitlines()
        return f"HTTP {status}: {text[0][:200] if text else 'no details'}"


def _why(exc: httpx.HTTPError) -> str:
    return str(exc) or type(exc).__name__
