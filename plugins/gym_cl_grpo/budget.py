"""What the API calls of a run cost, and the run's budget (docs/algorithms.md §8.4).

Every request an OpenAI-compatible endpoint answers is charged here with the token
counts of its reply's ``usage`` and the endpoint's prices (USD per million tokens, set per
model in its config). The totals live in ``<run_dir>/api_usage.json``, rewritten
atomically after every charge, so they survive a crash and a resumed run keeps counting
from what was really spent (steps redone after a resume cost again, and count again).

The budget (``algorithm.max_api_tokens``, ``algorithm.max_api_cost``; None: no limit) is
checked before every request: once spent, no request leaves and :class:`BudgetExhausted`
says so. Requests already in flight finish, so the overshoot is at most
``concurrency`` replies.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from gym_cl_grpo.llm import LLMError
from gym_core.api import GymError, write_json

FIELDS = ("calls", "input_tokens", "output_tokens", "cost", "seconds", "retries",
          "usage_missing")


class BudgetExhausted(LLMError):
    """The run's API budget is spent; the message names the limit to raise."""


def empty() -> dict[str, float]:
    return {k: 0 for k in FIELDS}


class Ledger:
    """Thread-safe usage totals (overall and per endpoint label), the budget, and their
    file. ``path`` None keeps them in memory only (a client used outside a run)."""

    def __init__(self, path: Path | None = None, max_tokens: int | None = None,
                 max_cost: float | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.max_tokens, self.max_cost = max_tokens, max_cost
        self.lock = threading.Lock()
        self.total = empty()
        self.by_endpoint: dict[str, dict[str, float]] = {}
        self.last_step: dict[str, float] | None = None  # what the last complete step took
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            total = {k: data["total"][k] for k in FIELDS}
            by = {name: {k: row[k] for k in FIELDS} for name, row in data["by_endpoint"].items()}
            if not all(isinstance(v, (int, float)) for v in total.values()):
                raise ValueError("a total is not a number")
            last = data.get("last_step")
            last = None if last is None else {k: float(last[k]) for k in FIELDS}
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise GymError(
                f"{self.path} is not gym's API usage record ({type(exc).__name__}: {exc}); it "
                "holds what this run's API calls cost so far: restore it, or move it away "
                "to count from zero") from None
        self.total, self.by_endpoint, self.last_step = total, by, last

    # -- the budget ---------------------------------------------------------------------
    def spent_line(self) -> str:
        t = self.total
        return (f"{int(t['input_tokens'] + t['output_tokens'])} tokens, "
                f"{t['cost']:.6g} USD in {int(t['calls'])} calls")

    def exhausted(self) -> str | None:
        """Which limit is reached, as the option to raise, or None."""
        t = self.total
        if self.max_tokens is not None and t["input_tokens"] + t["output_tokens"] >= self.max_tokens:
            return f"algorithm.max_api_tokens={self.max_tokens}"
        if self.max_cost is not None and t["cost"] >= self.max_cost:
            return f"algorithm.max_api_cost={self.max_cost:g}"
        return None

    def check(self) -> None:
        """Raise :class:`BudgetExhausted` when no request may leave."""
        with self.lock:
            limit = self.exhausted()
        if limit:
            raise BudgetExhausted(
                f"the API budget {limit} is spent ({self.spent_line()}, recorded in "
                f"{self.path}); raise it and run the same command again: the run resumes "
                "from its last checkpoint and the experience library goes back to that step")

    def end_step(self, used: dict[str, float]) -> None:
        """Record what a complete step took (the estimate of the next one's cost)."""
        with self.lock:
            self.last_step = dict(used)
            self._save()

    def remaining_fraction(self, per_step: dict[str, float]) -> bool:
        """Whether another step costing about ``per_step`` still fits the budget."""
        t = self.total
        tokens = per_step["input_tokens"] + per_step["output_tokens"]
        if self.max_tokens is not None and \
                t["input_tokens"] + t["output_tokens"] + tokens > self.max_tokens:
            return False
        return self.max_cost is None or t["cost"] + per_step["cost"] <= self.max_cost

    # -- charging -----------------------------------------------------------------------
    def charge(self, endpoint: str, usage: dict[str, float]) -> None:
        with self.lock:
            row = self.by_endpoint.setdefault(endpoint, empty())
            for k in FIELDS:
                row[k] += usage.get(k, 0)
                self.total[k] += usage.get(k, 0)
            self._save()

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return dict(self.total)

    def _save(self) -> None:
        if self.path is not None:
            write_json(self.path, {"total": self.total, "by_endpoint": self.by_endpoint,
                                   "last_step": self.last_step,
                                   "max_api_tokens": self.max_tokens,
                                   "max_api_cost": self.max_cost})

    def report(self) -> dict[str, Any]:
        with self.lock:
            t = self.total
            return {"api_calls": int(t["calls"]), "api_input_tokens": int(t["input_tokens"]),
                    "api_output_tokens": int(t["output_tokens"]),
                    "api_cost_usd": round(t["cost"], 6), "api_seconds": round(t["seconds"], 3),
                    "api_by_endpoint": {k: dict(v) for k, v in self.by_endpoint.items()}}


def difference(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in FIELDS}
