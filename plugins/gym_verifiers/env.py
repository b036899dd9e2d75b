"""The verifiers adapter (``env=verifiers``): a verifiers ``MultiTurnEnv`` (``ToolEnv``,
``StatefulToolEnv``, a game of its own) stepped turn by turn with its own pieces, in the
order its ``rollout`` calls them (verifiers 0.1.10, ``verifiers/envs/multiturn_env.py``)::

    state = await env.init_state(row, client=None, model="gym")
    state = await env.setup_state(state)
    # each model turn:
    state["trajectory"].append(TrajectoryStep(prompt=..., completion=[assistant], ...))
    if not await env.is_completed(state):            # the @vf.stop conditions
        messages = await env.get_prompt_messages(state)   # calls env.env_response
    # at the end:
    await env.render_completion(state)
    await env.rubric.score_rollout(state)            # state["reward"], state["metrics"]

What verifiers' own loop gets from an OpenAI-compatible server (the assistant message,
its ``tool_calls`` parsed by the server) comes from the gym episode instead: the model's
sampled text, its tool calls parsed by gym's chat-template parser (the ids trained on are
the ids sampled; nothing is re-tokenised). The rubric's reward is the last turn's
reward; its metrics go into the turn's info.

One environment object per process and ``env.environment`` / ``env.args`` (loading it
builds its dataset); each episode has its own verifiers ``State``; the environment's
coroutines run on an event loop of the thread's own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import json
import re
import signal
import threading
from typing import Any

from gym_core.api import Action, Environment, GymError, Observation, Task

_loaded: dict[str, Any] = {}
_lock = threading.Lock()
_loops = threading.local()
_worker: concurrent.futures.ThreadPoolExecutor | None = None
TOOL_CALL = re.compile(r"<tool_call>.*?</tool_call>", re.DOTALL)


def load(environment: str | None, args: dict | None, key: str = "env.environment"):
    """The verifiers environment ``environment`` names (loaded once per process)."""
    if not environment:
        who = "env=verifiers" if key.startswith("env") else "data=verifiers"
        raise GymError(f"{who} needs env.environment=<a verifiers environment id (its "
                       "module's load_environment) or 'package.module:function'>")
    args = dict(args or {})
    cache_key = json.dumps([environment, args], sort_keys=True, default=str)
    with _lock:
        if cache_key not in _loaded:
            _loaded[cache_key] = _load(environment, args, key)
        return _loaded[cache_key]


def _load(environment: str, args: dict, key: str):
    import logging

    import verifiers as vf

    # verifiers logs a failed load before raising it: the raised error is the one line
    log = logging.getLogger("verifiers.utils.env_utils")
    level = log.level
    log.setLevel(logging.CRITICAL)
    # a verifiers Environment installs SIGINT / SIGTERM handlers of its own (its
    # teardown, then exit): the run's handlers stay in place
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    real_signal = signal.signal
    if not main:  # signal.signal is refused off the main thread: verifiers' call skipped
        signal.signal = lambda *a: None  # type: ignore[assignment]
    try:
        if ":" in environment:
            module, _, name = environment.partition(":")
            try:
                fn = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError, ValueError) as e:
                raise GymError(f"{key}={environment!r} cannot be imported ({e}); give a "
                               "verifiers environment id or 'package.module:function'") from e
            try:
                env = fn(**args)
            except Exception as e:  # as verifiers' load_environment reports it
                raise GymError(f"{key}={environment!r}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from e
        else:
            try:
                env = vf.load_environment(environment, **args)
            except (ValueError, RuntimeError, AttributeError) as e:
                first = str(e).splitlines()[0]
                raise GymError(f"{key}={environment!r}: {first} (verifiers' "
                               "load_environment imports the module of that name and calls "
                               "its load_environment)") from e
    finally:
        log.setLevel(level)
        signal.signal = real_signal
        for s, handler in saved.items():
            signal.signal(s, handler)
    if not isinstance(env, vf.MultiTurnEnv):
        raise GymError(f"{key}={environment!r} gave {type(env).__name__}, not a verifiers "
                       "MultiTurnEnv (SingleTurnEnv, ToolEnv, ... derive from it)")
    if env.message_type != "chat":
        raise GymError(f"{key}={environment!r} is a completion environment "
                       f"(message_type={env.message_type!r}); env=verifiers plays chat ones")
    rubric = env.rubric
    group = [f.__name__ for f in rubric._get_reward_funcs() if rubric._is_group_func(f)]
    if group:
        raise GymError(f"{key}={environment!r}: the rubric's group reward functions {group} "
                       "score a whole group of rollouts; each gym episode is scored on its own")
    return env


def _clean(value):
    """A dataset row's value without the None fields Arrow adds to messages."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def verifiers_task(cfg) -> Task:
    """``data=verifiers``: the environment's dataset (train) and eval_dataset (held out);
    without an eval_dataset, ``test_size`` seeded rows of the dataset are held out."""
    import random

    env = load(cfg.environment, cfg.args, "data.environment")
    train = [_clean(dict(r)) for r in env.get_dataset()]
    if env.eval_dataset_source is not None or env.eval_dataset is not None:
        test = [_clean(dict(r)) for r in env.get_eval_dataset()]
    else:
        if len(train) <= cfg.test_size:
            raise GymError(f"data.test_size={cfg.test_size}: the dataset of "
                           f"{cfg.environment!r} has {len(train)} rows and no eval_dataset; "
                           "hold out fewer")
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        held = set(order[:cfg.test_size])
        test = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    return Task(f"verifiers:{cfg.environment}", train, test, metric=None)


def run(coro):
    """The environment's coroutine run to its end on this thread's event loop (one per
    thread, kept: what a shared environment binds to a loop stays usable); from inside a
    running loop, on a worker thread's."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        loop = getattr(_loops, "loop", None)
        if loop is None:
            loop = _loops.loop = asyncio.new_event_loop()
        return loop.run_until_complete(coro)
    global _worker
    with _lock:
        if _worker is None:
            _worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="verifiers")
    return _worker.submit(run, coro).result()


class Verifiers(Environment):
    """A verifiers environment's episode (``env.environment``)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.vf_env = load(cfg.environment, cfg.args)
        self.state = None
        self._tools = {}

    def check_row(self, row):
        prompt = row.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and "role" in m for m in prompt))):
            raise GymError(f"env=verifiers needs rows with a 'prompt' (chat messages, as "
                           f"data=verifiers gives them, or a string); this row has "
                           f"{sorted(row)}")

    def _input(self, row) -> dict:
        """The verifiers RolloutInput of a row: its prompt as chat messages (a string
        prompt after the environment's system prompt and few-shot turns)."""
        prompt = row["prompt"]
        if isinstance(prompt, str):
            env = self.vf_env
            prompt = ([{"role": "system", "content": env.system_prompt}] if env.system_prompt
                      else []) + list(env.few_shot or []) + [{"role": "user", "content": prompt}]
        out = {k: v for k, v in row.items() if k in ("answer", "task", "info", "example_id")}
        out["prompt"] = [dict(m) for m in prompt]
        out.setdefault("example_id", 0)
        return out

    def reset(self, row: dict[str, Any]) -> Observation:
        self.check_row(row)
        self.row = row
        env = self.vf_env
        state = run(env.init_state(self._input(row), None, "gym", None))
        state = run(env.setup_state(state))
        if run(env.is_completed(state)):
            raise GymError(f"env.environment={self.cfg.environment!r} ended the episode "
                           f"before the first turn ({state.get('stop_condition')}: "
                           f"{state.get('error')!r})")
        self.state = state
        self.prompt = list(state["prompt"])
        tools = [self._tool(s) for s in state.get("oai_tools") or []]
        self._tools = {t.__name__: t for t in tools}
        return Observation([_message(m) for m in self.prompt], tools)

    def _tool(self, schema: dict):
        """A ToolEnv tool as the model sees it: its OpenAI schema (verifiers'
        ``convert_func_to_oai_tool``); calls go through the environment's env_response."""
        name = schema["function"]["name"]

        def call(**arguments):
            from verifiers.utils.async_utils import maybe_await

            return run(maybe_await(self.vf_env.tool_map[name], **arguments))

        call.__name__ = name
        call.__tool_schema__ = schema
        return call

    def step(self, action: Action):
        import verifiers as vf

        env, state = self.vf_env, self.state
        message: dict[str, Any] = {"role": "assistant", "content": action.content}
        if action.tool_calls:  # as an OpenAI-compatible server returns them
            message["content"] = TOOL_CALL.sub("", action.content).strip()
            message["tool_calls"] = [
                {"id": f"call_{len(state['trajectory'])}_{i}", "type": "function",
                 "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                for i, c in enumerate(action.tool_calls)]
        step = vf.TrajectoryStep(prompt=self.prompt, completion=[message], response=None,
                                 tokens=None, reward=None, advantage=None,
                                 is_truncated=False, trajectory_id=state["trajectory_id"],
                                 extras={})
        run(env.add_trajectory_step(state, step))
        info = {"tool_calls": len(action.tool_calls), "tool_errors": int(bool(action.error))}
        if run(env.is_completed(state)):
            return None, self._score(info), True, info
        if len(state["trajectory"]) >= int(self.cfg.max_turns):
            # gym's turn limit ends the episode after this turn: scored as verifiers
            # scores a rollout its own max_turns ends
            return "", self._score(info), False, info
        history = self.prompt + [message]
        messages = run(env.get_prompt_messages(state))
        if run(env.is_completed(state)):  # a final_env_response: no model turn follows
            return None, self._score(info), True, info
        if messages[:len(history)] != history:
            raise GymError(f"env.environment={self.cfg.environment!r}: get_prompt_messages "
                           "rewrote the conversation; a gym episode extends it turn by turn")
        self.prompt = list(messages)
        return [_message(m) for m in messages[len(history):]] or "", 0.0, False, info

    def _score(self, info: dict) -> float:
        """The rubric's reward for the episode so far; its metrics into ``info``."""
        env, state = self.vf_env, self.state
        if state.get("error") is not None:  # the environment failed (a vf.Error)
            raise state["error"]
        run(env.render_completion(state))
        run(env.rubric.score_rollout(state))
        for k, v in (state.get("metrics") or {}).items():
            if isinstance(v, (int, float)):
                info[f"rubric/{k}"] = float(v)
        return float(state["reward"])

    def close(self) -> None:
        if self.state is not None and not self.state.get("is_completed"):
            run(self.vf_env._cleanup(self.state))  # the @vf.cleanup handlers
        self.state = None


def _message(m) -> dict:
    """A verifiers message as a gym chat message (text content, no tool-call ids)."""
    m = dict(m)
    content = m.get("content")
    if isinstance(content, list):  # content parts: their text
        content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    out = {"role": m["role"], "content": "" if content is None else str(content)}
    if m.get("tool_calls"):
        out["tool_calls"] = m["tool_calls"]
    return out

