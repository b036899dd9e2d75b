"""The ``data=reasoning_gym`` task and its ``reasoning_gym`` reward (see the package doc)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from functools import lru_cache

from gym_core.api import GymError, Task


def _rg():
    try:
        import reasoning_gym
    except ImportError:
        raise GymError("data=reasoning_gym needs the reasoning-gym package: "
                       "pip install 'gym-core[reasoning]'") from None
    return reasoning_gym


@lru_cache(maxsize=256)
def generator(name: str, settings: str, seed: int, size: int):
    """reasoning-gym's dataset ``name`` with ``settings`` (JSON), one error line if not."""
    rg = _rg()
    known = sorted(rg.factory.DATASETS)
    if name not in known:
        near = [k for k in known if name.split("_")[0] in k][:8]
        raise GymError(f"data.tasks: reasoning-gym has no task {name!r}"
                       + (f" (similar: {', '.join(near)})" if near else "")
                       + f"; it has {len(known)} tasks, e.g. {', '.join(known[:12])}, ...")
    try:
        return rg.create_dataset(name, seed=seed, size=size, **json.loads(settings))
    except (TypeError, ValueError, AssertionError) as exc:
        raise GymError(f"data.tasks.{name}: reasoning-gym refuses the settings {settings} "
                       f"({' '.join(str(exc).split()) or type(exc).__name__})") from None


def extract(completion: str) -> str:
    """The answer a completion gives: the last ``<answer>...</answer>`` (reasoning-gym's
    own ``extract_answer``), else the completion's last non-empty line."""
    from reasoning_gym.utils import extract_answer

    found = extract_answer(completion, tag_name="answer")
    if found is not None:
        return found.strip()
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def score(prompts, completions, examples) -> list[float | None]:
    """The task's own ``score_answer`` on each completion's answer."""
    out: list[float | None] = []
    for c, ex in zip(completions, examples):
        if "rg_task" not in ex:
            out.append(None)  # not a reasoning-gym row
            continue
        ds = generator(ex["rg_task"], ex["rg_settings"], 0, 1)
        out.append(float(ds.score_answer(extract(c), entry=ex["entry"])))
    return out


class Stream(Sequence):
    """``size`` rows drawn from the tasks by weight (a seeded plan), each generated when
    read; ``skip`` holds questions that must not appear (the held-out set's)."""

    def __init__(self, specs, size: int, seed: int, answer_format: str,
                 skip: frozenset[str] = frozenset()):
        rng = random.Random(seed)
        names = [s[0] for s in specs]
        weights = [s[1] for s in specs]
        self.plan = rng.choices(range(len(specs)), weights=weights, k=size)
        counts = [0] * len(specs)
        self.local = []
        for t in self.plan:
            self.local.append(counts[t])
            counts[t] += 1
        # each task's own generator, seeded per stream; sized with room for skipped rows
        self.gens = [generator(n, st, seed * 7919 + i, 2 * max(counts[i], 1) + 64)
                     for i, (n, _, st) in enumerate(specs)]
        self.specs, self.names, self.skip = specs, names, skip
        self.fmt, self.seed = answer_format, seed

    def __len__(self) -> int:
        return len(self.plan)

    def _entry(self, t: int, j: int) -> dict:
        gen = self.gens[t]
        k = j
        for _ in range(1000):
            entry = gen[k] if k < len(gen) else _regen(self.specs[t], self.seed, k)
            if entry["question"] not in self.skip:
                return entry
            k += len(self.plan) + 1  # a held-out question: take one past the stream's rows
        raise GymError(f"data.tasks.{self.specs[t][0]}: its settings allow so few distinct "
                       "questions that the held-out set holds them all; widen the settings "
                       "or lower data.test_size")

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        t, j = self.plan[i], self.local[i]
        entry = self._entry(t, j)
        name, _, settings = self.specs[t]
        answer = str(entry["answer"])
        gen = self.gens[t]
        rejected = None
        for step in range(1, 11):  # another row's answer that this row's scorer rejects
            other = str(gen[(j + step) % len(gen)]["answer"])
            if other != answer and float(gen.score_answer(other, entry=entry)) < 1.0:
                rejected = other
                break
        return {
            "prompt": entry["question"],
            "answer": answer,
            "chosen": self.fmt.format(answer=answer),
            "rejected": self.fmt.format(answer=rejected if rejected is not None else "?"),
            "rg_task": name,
            "rg_settings": settings,
            "entry": _plain(entry),
            "source": name,
        }

    @property
    def columns(self) -> list[str]:
        return ["answer", "chosen", "entry", "prompt", "rejected", "rg_settings", "rg_task",
                "source"]

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(self.names))

    def digest(self) -> str:
        return json.dumps([self.specs, len(self), self.seed, self.fmt, sorted(self.skip)[:50]])


def _regen(spec, seed: int, k: int) -> dict:
    name, _, settings = spec
    return generator(name, settings, seed * 7919 + 104729 + k, 1)[0]


def _plain(entry: dict) -> dict:
    """The entry as JSON-able data (metadata may hold tuples or sets)."""
    return json.loads(json.dumps(entry, default=lambda o: sorted(o) if isinstance(o, set)
                                 else str(o)))


def reasoning_gym_task(cfg) -> Task:
    from omegaconf import OmegaConf

    from gym_reasoning_gym import DEFAULT_TASKS

    tasks = cfg.tasks if cfg.tasks is not None else DEFAULT_TASKS
    tasks = OmegaConf.to_container(tasks) if OmegaConf.is_config(tasks) else tasks
    if not isinstance(tasks, dict):
        raise GymError("data.tasks must map task names to settings, e.g. "
                       "data.tasks={leg_counting:{weight:2,min_animals:1,max_animals:4},chain_sum:{weight:1}}")
    if not tasks:
        raise GymError("data.tasks is empty: name at least one reasoning-gym task, e.g. "
                       "data.tasks={leg_counting:{weight:1}}")
    specs = []
    for name, opts in tasks.items():
        if opts is not None and not isinstance(opts, dict):
            raise GymError(f"data.tasks.{name} must be a map such as {{weight: 1}}, "
                           f"not {opts!r}")
        opts = dict(opts or {})
        weight = opts.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
            raise GymError(f"data.tasks.{name}.weight={weight!r} must be a number above 0")
        specs.append((name, float(weight), json.dumps(opts, sort_keys=True)))
    if cfg.train_size < 1 or cfg.test_size < 1:
        raise GymError(f"data.train_size={cfg.train_size} and data.test_size={cfg.test_size} "
                       "must be at least 1")
    for name, _, settings in specs:
        generator(name, settings, 0, 1)  # an unknown task or setting fails now
    test = Stream(specs, cfg.test_size, cfg.seed * 2 + 1, cfg.answer_format)
    held_out = frozenset(test[i]["prompt"] for i in range(len(test)))
    train = Stream(specs, cfg.train_size, cfg.seed * 2, cfg.answer_format, skip=held_out)
    return Task("reasoning_gym", train, list(test), metric="reasoning_gym")
