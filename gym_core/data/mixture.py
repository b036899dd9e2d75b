"""``data.mixture``: several ``data=hf`` sources interleaved by weight.

Each source (path/subset/data_files/split/eval_split/test_size/columns, or a
LLaMA-Factory ``dataset_info`` entry) is loaded as :func:`gym_core.data.hf.load_source`
loads one, and a seeded plan says which source each training row comes from: row ``k``
is drawn from source ``s`` with probability ``weight_s / sum(weights)``, and each
source is read in its own seeded shuffled order, starting a new order when it runs out
(a small, heavily weighted source is repeated; TRL's ``interleave_datasets`` with
``stopping_strategy="all_exhausted"`` behaves alike). The mixture holds as many rows as
its sources together; the held-out split is every source's held-out rows. Each example
carries ``source`` (the source's name), which the training loop counts per step
(``data/rows_<source>`` metrics).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np

from gym_core.base.errors import GymError
from gym_core.data.tasks import Task

SOURCE_KEYS = ("path", "subset", "data_files", "split", "eval_split", "test_size", "columns",
               "weight", "name", "dataset_info", "dataset")


class MixtureRows(Sequence):
    """Rows of several sources in a seeded, weighted order (see the module's doc)."""

    def __init__(self, parts: list, names: list[str], weights: list[float], seed: int):
        self.parts, self.sources = parts, names
        total = sum(len(p) for p in parts)
        rng = np.random.default_rng(seed)
        p = np.asarray(weights, dtype=np.float64)
        self.which = rng.choice(len(parts), size=total, p=p / p.sum()).astype(np.int32)
        self.index = np.empty(total, dtype=np.int64)
        for s, part in enumerate(parts):
            at = np.flatnonzero(self.which == s)
            n = len(part)
            reps = -(-len(at) // n) if len(at) else 0
            order = np.concatenate([rng.permutation(n) for _ in range(reps)]) if reps else []
            self.index[at] = np.asarray(order[: len(at)], dtype=np.int64)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.parts[int(self.which[i])][int(self.index[i])]

    def counts(self) -> dict[str, int]:
        """Rows of each source in the mixture."""
        got = np.bincount(self.which, minlength=len(self.parts))
        return {name: int(c) for name, c in zip(self.sources, got)}

    @property
    def columns(self) -> list[str]:
        return sorted(set().union(*(set(p.columns) for p in self.parts)) | {"source"})

    def digest(self) -> str:
        h = hashlib.sha256(f"{self.seed}".encode())
        for part in self.parts:
            h.update(part.digest().encode())
        h.update(self.which.tobytes())
        return h.hexdigest()


class ConcatRows(Sequence):
    """Several sources' held-out rows one after the other."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = np.cumsum([0, *(len(p) for p in parts)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[s][int(i - self.starts[s])]

    @property
    def columns(self) -> list[str]:
        return sorted(set().union(*(set(p.columns) for p in self.parts)))

    def digest(self) -> str:
        return hashlib.sha256("|".join(p.digest() for p in self.parts).encode()).hexdigest()


def source_name(entry, i: int) -> str:
    """A source's metric-friendly name: its ``name``, else its path's stem."""
    name = entry.get("name") or entry.get("dataset") or str(entry.get("path") or f"source{i}")
    name = re.sub(r"\.(parquet|jsonl|json|csv|arrow)$", "", name.rstrip("/").split("/")[-1])
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or f"source{i}"


def mixture_task(cfg) -> Task:
    from omegaconf import OmegaConf

    from gym_core.data.hf import load_source

    entries = cfg.mixture
    if not isinstance(entries, (list, Sequence)) or isinstance(entries, str):
        raise GymError("data.mixture must be a list of sources, e.g. "
                       "data.mixture=[{path:a.jsonl,weight:2},{path:b.parquet,weight:1}]")
    parts_train, parts_test, names, weights = [], [], [], []
    for i, raw in enumerate(entries):
        label = f"data.mixture[{i}]"
        entry = OmegaConf.to_container(raw) if OmegaConf.is_config(raw) else dict(raw)
        if not isinstance(entry, dict):
            raise GymError(f"{label} must be a mapping such as {{path: a.jsonl, weight: 1}}")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise GymError(f"{label} has unknown key(s) {', '.join(unknown)}; a source takes "
                           f"{', '.join(SOURCE_KEYS)}")
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
            raise GymError(f"{label}.weight={weight!r} must be a number above 0 (a source's "
                           "share of the training rows)")
        name = source_name(entry, i)
        if name in names:
            name = f"{name}_{i}"
        src = SimpleNamespace(
            path=entry.get("path"), subset=entry.get("subset"),
            data_files=entry.get("data_files"), split=entry.get("split", "train"),
            eval_split=entry.get("eval_split"), test_size=entry.get("test_size", cfg.test_size),
            columns=entry.get("columns") or {}, dataset_info=entry.get("dataset_info"),
            dataset=entry.get("dataset"), source_name=name)
        train, test = load_source(src, cfg, label)
        parts_train.append(train)
        parts_test.append(test)
        names.append(name)
        weights.append(float(weight))
    if not parts_train:
        raise GymError("data.mixture is empty: list at least one source")
    train = MixtureRows(parts_train, names, weights, cfg.seed)
    test = ConcatRows(parts_test)
    metric = cfg.verifier if all("answer" in p.columns for p in parts_train) else None
    return Task("hf_mixture", train, test, metric=metric)
