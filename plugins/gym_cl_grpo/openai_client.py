"""A small OpenAI-compatible chat-completions client on the standard library (urllib):
timeouts, retries with exponential backoff on 429 / 5xx / connection errors (honouring
``Retry-After``), and errors that name the option to fix. The key is sent only in the
Authorization header and never appears in an error message."""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from gym_cl_grpo import OpenAIChatConfig
from gym_cl_grpo.llm import ChatLLM, LLMError, Message

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAIChat(ChatLLM):
    Config = OpenAIChatConfig

    def __init__(self, cfg, policy=None) -> None:
        super().__init__(cfg, policy)
        key = os.environ.get(cfg.api_key_env, "")
        if not key:
            raise LLMError(
                f"llm=openai reads its API key from the environment variable "
                f"{cfg.api_key_env} (llm.api_key_env), which is not set. Set it "
                f"(export {cfg.api_key_env}=...) or name another variable with "
                "llm.api_key_env=NAME"
            )
        self._key = key
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._retries_lock = threading.Lock()  # complete() runs on a thread pool

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIChat(url={self.url!r}, model={self.cfg.model!r})"

    def chat(self, conversations: list[list[Message]]) -> list[str]:
        if not conversations:
            return []
        workers = max(1, min(int(self.cfg.concurrency), len(conversations)))
        with ThreadPoolExecutor(workers) as pool:
            replies = list(pool.map(self.complete, conversations))
        self.calls += len(conversations)
        return replies

    def complete(self, messages: list[Message]) -> str:
        """One chat completion: the first choice's message content."""
        body = {"model": self.cfg.model, "messages": messages,
                "max_tokens": self.cfg.max_new_tokens, "temperature": self.cfg.temperature}
        data = json.dumps(body).encode("utf-8")
        wait = self.cfg.backoff_s
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                with self._retries_lock:
                    self.retries += 1
            request = urllib.request.Request(self.url, data=data, method="POST", headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self._key}",
            })
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as resp:
                    return self._content(resp.read())
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code not in RETRY_STATUS:
                    hint = (f"; check the key in {self.cfg.api_key_env}"
                            if exc.code in (401, 403) else
                            "; check llm.model and llm.base_url" if exc.code in (400, 404)
                            else "")
                    raise LLMError(f"{self.url} answered HTTP {exc.code}: {detail}{hint}") from None
                last = f"HTTP {exc.code}: {detail}"
                retry_after = _retry_after(exc.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
            if attempt < self.cfg.max_retries:
                delay = retry_after if retry_after is not None else wait * (1 + random.random())
                time.sleep(min(delay, self.cfg.max_backoff_s))
                wait = min(wait * 2, self.cfg.max_backoff_s)
        raise LLMError(
            f"could not get a reply from llm.base_url={self.cfg.base_url} after "
            f"{self.cfg.max_retries + 1} attempts (last: {last}). Check that the server is "
            "running and reachable, or raise llm.max_retries / llm.timeout_s"
        )

    def _content(self, raw: bytes) -> str:
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise LLMError(
                f"{self.url} sent a reply that is not a chat completion: {raw[:200]!r}"
            ) from None
        return content if isinstance(content, str) else ""


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read()[:500].decode("utf-8", "replace")
    except Exception:  # the body is only for the message
        body = ""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.strip() or str(exc.reason)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
