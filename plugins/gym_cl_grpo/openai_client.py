"""A small OpenAI-compatible chat-completions client on the standard library (urllib):
timeouts, retries with exponential backoff on 429 / 5xx / connection errors (honouring
``Retry-After``), usage and cost per request charged to the run's
:class:`~gym_cl_grpo.budget.Ledger` (which also refuses requests once the budget is
spent), OpenAI ``response_format`` for structured replies, and errors that name the
option to fix. The key is sent only in the Authorization header and never appears in an
error message, a config or a record."""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from gym_cl_grpo import OpenAIChatConfig
from gym_cl_grpo.budget import Ledger
from gym_cl_grpo.llm import ChatLLM, LLMError, Message

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class Reply:
    text: str
    finish_reason: str | None
    output_tokens: int | None  # the completion's tokens, from the reply's usage


class OpenAIChat(ChatLLM):
    """``label`` names the endpoint in the usage record ("llm", "policy"); ``option``
    is the config group whose settings the messages name (``llm``, ``policy``)."""

    Config = OpenAIChatConfig
    charges_usage = True  # make_llm passes the run's ledger

    def __init__(self, cfg, policy=None, *, ledger: Ledger | None = None, label: str = "llm",
                 option: str = "llm") -> None:
        super().__init__(cfg, policy)
        self.label, self.option = label, option
        key = os.environ.get(cfg.api_key_env, "")
        if not key:
            raise LLMError(
                f"{option}={cfg.name} reads its API key from the environment variable "
                f"{cfg.api_key_env} ({option}.api_key_env), which is not set. Set it "
                f"(export {cfg.api_key_env}=...) or name another variable with "
                f"{option}.api_key_env=NAME"
            )
        self._key = key
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.ledger = ledger if ledger is not None else Ledger()
        self._retries_lock = threading.Lock()  # complete() runs on a thread pool

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIChat(url={self.url!r}, model={self.cfg.model!r})"

    def chat(self, conversations: list[list[Message]], *, schema: dict | None = None,
             max_new_tokens: int | None = None, **overrides) -> list[str]:
        if max_new_tokens:
            overrides["max_tokens"] = max_new_tokens
        if schema is not None and getattr(self.cfg, "structured", False):
            from gym_cl_grpo.llm import response_format

            overrides["response_format"] = response_format(schema)
        return [r.text for r in self.replies(conversations, **overrides)]

    def replies(self, conversations: list[list[Message]], **overrides) -> list[Reply]:
        """One :class:`Reply` per conversation, in order; ``overrides`` (``max_tokens``,
        ``temperature``, ``seed``, ``response_format``: one value, or a list with one per
        conversation for ``seed``) replace the config's request fields."""
        if not conversations:
            return []
        seeds = overrides.pop("seeds", None)
        jobs = [(m, {**overrides, **({"seed": seeds[i]} if seeds else {})})
                for i, m in enumerate(conversations)]
        workers = max(1, min(int(self.cfg.concurrency), len(conversations)))
        with ThreadPoolExecutor(workers) as pool:
            out = list(pool.map(lambda job: self.complete(job[0], **job[1]), jobs))
        self.calls += len(conversations)
        return out

    def complete(self, messages: list[Message], **overrides) -> Reply:
        """One chat completion: the first choice."""
        body: dict[str, Any] = {"model": self.cfg.model, "messages": messages,
                                "max_tokens": self.cfg.max_new_tokens,
                                "temperature": self.cfg.temperature}
        body.update({k: v for k, v in overrides.items() if v is not None})
        data = json.dumps(body).encode("utf-8")
        wait = self.cfg.backoff_s
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            self.ledger.check()  # a spent budget: no request leaves
            if attempt:
                with self._retries_lock:
                    self.retries += 1
                self.ledger.charge(self.label, {"retries": 1})
            request = urllib.request.Request(self.url, data=data, method="POST", headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self._key}",
            })
            retry_after = None
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as resp:
                    raw = resp.read()
                return self._reply(raw, time.perf_counter() - t0)
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code not in RETRY_STATUS:
                    opt = self.option
                    hint = (f"; check the key in {self.cfg.api_key_env}"
                            if exc.code in (401, 403) else
                            f"; check {opt}.model and {opt}.base_url" if exc.code in (400, 404)
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
            f"could not get a reply from {self.option}.base_url={self.cfg.base_url} after "
            f"{self.cfg.max_retries + 1} attempts (last: {last}). Check that the server is "
            f"running and reachable, or raise {self.option}.max_retries / "
            f"{self.option}.timeout_s"
        )

    def _reply(self, raw: bytes, seconds: float) -> Reply:
        try:
            reply = json.loads(raw)
            choice = reply["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            # what was sent was still answered: count the call (no token counts)
            self.ledger.charge(self.label, {"calls": 1, "seconds": seconds, "usage_missing": 1})
            raise LLMError(
                f"{self.url} sent a reply that is not a chat completion: {raw[:200]!r}"
            ) from None
        usage = reply.get("usage") if isinstance(reply, dict) else None
        tin = tout = None
        if isinstance(usage, dict):
            tin, tout = usage.get("prompt_tokens"), usage.get("completion_tokens")
        ok = isinstance(tin, int) and isinstance(tout, int)
        tin, tout = (tin, tout) if ok else (0, 0)
        cost = (tin * self.cfg.input_price + tout * self.cfg.output_price) / 1e6
        self.ledger.charge(self.label, {"calls": 1, "input_tokens": tin, "output_tokens": tout,
                                        "cost": cost, "seconds": seconds,
                                        "usage_missing": 0 if ok else 1})
        return Reply(content if isinstance(content, str) else "", choice.get("finish_reason"),
                     tout if ok else None)


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
