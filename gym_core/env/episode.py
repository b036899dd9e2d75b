"""One episode's bookkeeping between the sampler and its environment: the prompt from
``reset``, each model turn handed to ``step``, the environment's reply rendered as the
token ids to append, the limits (turns, tokens, seconds) and the recorded errors.

Nothing an environment does stops the run: an exception, a value of the wrong type, an
episode that never ends or an observation that is too long ends (or cuts) the episode
with a recorded error; the sampler goes on with the other rows.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from gym_core.env.chat import continuation, render
from gym_core.env.tools import Action, parse_tool_calls, tool_schema

#: A row's addition to its episode's system turn (an algorithm's, e.g. cl_grpo's experience
#: library): appended to the system message of ``reset`` (or of the policy's system
#: prompt), or the system turn itself when there is none. The environment never reads it.
SYSTEM_ADDITION = "episode_system_addition"


@dataclass
class EpisodeRecord:
    """What happened in an episode: kept with the rollout, summarised in the metrics."""

    rewards: list[float] = field(default_factory=list)  # one per model turn
    turns: int = 0
    done: bool = False  # the environment ended it (not a limit)
    truncated: bool = False  # ended by a limit (tokens, turns, seconds)
    error: str | None = None  # the environment failed: the episode is not trained on
    tool_calls: int = 0
    tool_errors: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)  # for logs and lessons
    infos: list[dict[str, Any]] = field(default_factory=list)


def _short(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    at = f" at {where[0].filename}:{where[0].lineno}" if where else ""
    return f"{type(exc).__name__}: {exc}"[:300] + at


class Episode:
    """One row's episode. ``start()`` returns the prompt's token ids; after each model
    turn ``after_turn(ids, finished)`` returns the ids to append (the environment's
    reply and the next assistant header) or None when the episode is over."""

    def __init__(self, env_cls, cfg, row: dict[str, Any], tokenizer, system_prompt=None):
        self.cfg, self.row, self.tok = cfg, row, tokenizer
        self.system_prompt = system_prompt
        self.record = EpisodeRecord()
        self.env = None
        self.schemas: list[dict] | None = None
        # seconds spent in the environment (creating it, reset, steps and their tools):
        # env.max_seconds bounds those. The model's own turns are bounded by tokens
        # (env.max_tokens), and their wall time depends on how many episodes share the
        # batch and the machine, so it must not decide an episode's outcome.
        self.env_seconds = 0.0
        self.used = 0  # episode tokens so far (after the prompt)
        t0 = time.monotonic()
        try:
            self.env = env_cls(cfg)
        except Exception as exc:
            self.fail(f"env={cfg.name}: creating the environment raised {_short(exc)}")
        self.env_seconds += time.monotonic() - t0

    @property
    def out_of_time(self) -> bool:
        return self.env_seconds > float(self.cfg.max_seconds)

    def fail(self, message: str) -> None:
        self.record.error = message
        self.close()

    def close(self) -> None:
        if self.env is not None:
            try:
                self.env.close()
            except Exception as exc:  # a failing close is recorded, not raised
                self.record.error = self.record.error or f"close raised {_short(exc)}"
            self.env = None

    @property
    def over(self) -> bool:
        return self.env is None

    def start(self) -> str | None:
        """The prompt text (rendered with the tools and a generation prompt), or None when
        ``reset`` failed (then the episode is over before it starts)."""
        if self.env is None:
            return None
        from gym_core.env.base import Observation

        t0 = time.monotonic()
        try:
            obs = self.env.reset(self.row)
        except Exception as exc:
            self.fail(f"env={self.cfg.name}: reset raised {_short(exc)}")
            return None
        finally:
            self.env_seconds += time.monotonic() - t0
        if isinstance(obs, (str, list)):
            obs = Observation(_as_messages(obs, "user"))
        if not isinstance(obs, Observation) or not isinstance(obs.messages, list) or not all(
                isinstance(m, dict) and "role" in m for m in obs.messages):
            self.fail(f"env={self.cfg.name}: reset returned {type(obs).__name__}, not an "
                      "Observation (chat messages and tools) or a string")
            return None
        messages = list(obs.messages)
        if self.system_prompt and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        extra = self.row.get(SYSTEM_ADDITION)
        if extra and messages and messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{extra}"}
        elif extra:
            messages.insert(0, {"role": "system", "content": extra})
        try:
            self.schemas = [tool_schema(t) for t in obs.tools] or None
        except Exception as exc:
            self.fail(f"env={self.cfg.name}: {exc}")
            return None
        self.record.messages = messages
        return render(self.tok, messages, self.schemas, add_generation_prompt=True)

    def after_turn(self, ids: list[int], finished: bool, budget: int) -> list[int] | None:
        """The model's turn ``ids`` (ending with its end-of-turn token when
        ``finished``); ``budget``: the tokens the episode has left. Returns the ids to
        append, or None when the episode is over."""
        rec = self.record
        self.used += len(ids)
        text = self.tok.decode(ids, skip_special_tokens=True)
        calls, error = parse_tool_calls(text)
        rec.turns += 1
        rec.messages.append({"role": "assistant", "content": text})
        if not finished:  # cut by the token budget: the turn never ended
            rec.truncated = True
            self.close()
            return None
        if self.out_of_time:
            rec.truncated = True
            rec.infos.append({"limit": f"env.max_seconds={self.cfg.max_seconds}"})
            self.close()
            return None
        rec.tool_calls += len(calls)
        action = Action(text, list(ids), calls, error, finished)
        t0 = time.monotonic()
        try:
            out = self.env.step(action)
        except Exception as exc:
            rec.rewards.append(0.0)
            self.fail(f"env={self.cfg.name}: step raised {_short(exc)}")
            return None
        finally:
            self.env_seconds += time.monotonic() - t0
        checked = _check_step(out)
        if isinstance(checked, str):
            rec.rewards.append(0.0)
            self.fail(f"env={self.cfg.name}: step {checked}")
            return None
        obs, reward, done, info = checked
        rec.rewards.append(reward)
        rec.infos.append(info)
        errors = info.get("tool_errors", 0)
        rec.tool_errors += int(errors) if isinstance(errors, (int, float)) else 0
        if done:
            rec.done = True
            self.close()
            return None
        if rec.turns >= self.cfg.max_turns or self.out_of_time:
            rec.truncated = True
            self.close()
            return None
        new = _as_messages(obs, "tool" if calls or error else "user")
        new = [dict(m, content=self._cut(str(m.get("content", "")))) for m in new]
        try:
            text = continuation(self.tok, rec.messages, new, self.schemas)
        except Exception as exc:
            self.fail(f"env={self.cfg.name}: rendering the observation failed: {_short(exc)}")
            return None
        rec.messages.extend(new)
        add = self.tok(text, add_special_tokens=False).input_ids
        if len(add) >= budget:  # no room left for the model to answer
            rec.truncated = True
            self.close()
            return None
        self.used += len(add)
        return add

    def _cut(self, content: str) -> str:
        """An observation cut to ``max_observation_tokens`` tokens, with a note."""
        limit = int(self.cfg.max_observation_tokens)
        rough = content[: limit * 8]  # never tokenise a huge text whole
        ids = self.tok(rough, add_special_tokens=False).input_ids
        if len(ids) <= limit and len(rough) == len(content):
            return content
        kept = self.tok.decode(ids[:limit])
        return f"{kept}\n[observation cut: {len(content)} characters, {limit} tokens kept]"


def _as_messages(obs, role: str) -> list[dict]:
    if isinstance(obs, str):
        return [{"role": role, "content": obs}]
    return [dict(m) for m in obs]


def _check_step(out):
    """(obs, reward, done, info) with the right types, or what is wrong (a string)."""
    if not isinstance(out, tuple) or len(out) != 4:
        return f"returned {type(out).__name__}, not (observation, reward, done, info)"
    obs, reward, done, info = out
    try:
        reward = float(reward)
    except (TypeError, ValueError):
        return f"returned reward {reward!r} ({type(reward).__name__}), not a number"
    if reward != reward or reward in (float("inf"), float("-inf")):
        return f"returned reward {reward}, not a finite number"
    if not isinstance(done, (bool, int)):
        return f"returned done {done!r}, not a bool"
    if info is None:
        info = {}
    if not isinstance(info, dict):
        return f"returned info {type(info).__name__}, not a dict"
    if not done:
        ok = isinstance(obs, str) or (isinstance(obs, list) and all(
            isinstance(m, dict) and "role" in m for m in obs))
        if not ok:
            return (f"returned observation {type(obs).__name__}, not a string or a list of "
                    "chat messages")
    return obs, reward, bool(done), info
