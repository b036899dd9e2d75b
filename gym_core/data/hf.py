"""``data=hf``: datasets read through the Hugging Face ``datasets`` library, as TRL and
LLaMA-Factory read them (docs/guide.md "Your own data").

``data.path`` is a hub id (read from the local cache: gym never downloads at run time,
see :func:`_offline_hint`), a folder written by ``save_to_disk``, a data file
(``.parquet``, ``.jsonl``/``.json``, ``.csv``, ``.arrow``) or a builder name (``json``,
``parquet``, ``csv``, ``arrow``) with ``data.data_files``. The rows stay in the
dataset's memory-mapped Arrow table: a :class:`Rows` reads and normalises a row when the
sampler asks for it (tokenisation happens per batch), so nothing passes over the whole
dataset before the first step; the run's data digest is the dataset's fingerprint.

``data.mixture`` lists several sources with weights (:mod:`gym_core.data.mixture`);
``data.dataset_info`` reads LLaMA-Factory's registry (:mod:`gym_core.data.llamafactory`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gym_core.base.errors import GymError
from gym_core.data.formats import KNOWN, TYPE_COLUMNS, detect_type, normalize
from gym_core.data.tasks import Task

#: file suffixes and the ``datasets`` builder that reads them
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv",
            ".arrow": "arrow", ".txt": "text"}

TEXT_COLUMNS = ("prompt", "completion", "chosen", "rejected", "messages", "text")


class Rows(Sequence):
    """A dataset split as gym examples, read lazily: ``rows[i]`` decodes row ``i`` from
    the Arrow table and normalises it (:func:`gym_core.data.formats.normalize`); a slice
    is a list. ``source`` (a mixture's source name) is added to each example."""

    def __init__(self, ds, kind: str, where: str, source: str | None = None,
                 transform=None, skip=None) -> None:
        self.ds, self.kind, self.where, self.source = ds, kind, where, source
        self.transform = transform  # row -> row before normalising (LLaMA-Factory's)
        # the rows held out of ``ds`` (sorted table indices): row i of these Rows is the
        # i-th table row not in ``skip``, so a training split needs no index of its own
        self.skip = skip
        if skip is not None:
            self._shift = skip - np.arange(len(skip))  # table row = i + #(shift <= i)

    def __len__(self) -> int:
        return len(self.ds) - (0 if self.skip is None else len(self.skip))

    def _table_row(self, i: int) -> int:
        if self.skip is None:
            return i
        return i + int(np.searchsorted(self._shift, i, side="right"))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        i = self._table_row(i)
        row = self.ds[i]
        where = f"{self.where} row {i}"
        if self.transform is not None:
            row = self.transform(row, where)
        ex = normalize(row, self.kind, where)
        if self.source is not None:
            ex["source"] = self.source
        return ex

    @property
    def columns(self) -> list[str]:
        """The dataset's columns (after renaming; ``system`` and ``tools`` folded into the
        prompt), ``prompt`` for a preference dataset whose prompt is implicit."""
        if self.transform is not None and len(self):
            cols = set(self[0])
        else:
            cols = set(self.ds.column_names)
        if self.kind == "preference":
            cols.add("prompt")
        return sorted(cols - {"system", "tools", "source"})

    def digest(self) -> str:
        """What identifies these rows: the Arrow table's fingerprint (datasets' own hash
        of the files and the transforms applied), the type and the source."""
        fp = getattr(self.ds, "_fingerprint", None)
        if fp is None:  # a dataset built in memory (streamed rows): hash its rows
            h = hashlib.sha256()
            for row in self.ds:
                h.update(repr(sorted(row.items())).encode())
            fp = h.hexdigest()
        if self.skip is not None:
            fp += ":" + hashlib.sha256(self.skip.astype(np.int64).tobytes()).hexdigest()[:16]
        return f"{fp}:{self.kind}:{self.source}:{len(self)}"


def hf_task(cfg) -> Task:
    """The ``data=hf`` task: one source, or ``data.mixture``'s sources interleaved."""
    if cfg.mixture:
        from gym_core.data.mixture import mixture_task

        return mixture_task(cfg)
    train, test = load_source(cfg, cfg, "data")
    return Task("hf", train, test, metric=_metric(cfg, train))


def _metric(cfg, train: Rows) -> str | None:
    """The held-out metric: the verifier reward when the rows carry an ``answer``."""
    return cfg.verifier if "answer" in train.columns else None


def load_source(src, cfg, label: str) -> tuple[Rows, Rows]:
    """Train and held-out :class:`Rows` of one source (``data`` or ``data.mixture[i]``);
    ``src`` holds path/subset/data_files/split/eval_split/test_size/columns, ``cfg`` the
    shared settings (seed, cache_dir, streaming, max_samples)."""
    source = getattr(src, "source_name", None)
    if getattr(src, "dataset_info", None):
        from gym_core.data.llamafactory import load_registered

        return load_registered(src, cfg, label, source)
    if not src.path:
        raise GymError(f"{label}.path is not set: give a hub id, a save_to_disk folder, a "
                       "data file (.parquet, .jsonl, .csv, .arrow) or a builder (json, "
                       "parquet, csv) with data.data_files")
    where = f"{label}.path={src.path}"
    train, test = _open(src, cfg, where)
    train = _rename(train, src, where)
    kind = _check_columns(train, where)
    _check_features(train, where)
    skip = None
    if test is None:
        skip, test = _hold_out(train, src, cfg, where)
    else:
        test = _rename(test, src, where)
        _check_features(test, where)
    rows = Rows(train, kind, where, source, skip=skip), Rows(test, kind, where, source)
    if len(rows[0]) == 0:
        raise GymError(f"{where}: the training split {src.split!r} is empty")
    if len(test) == 0:
        raise GymError(f"{where}: the held-out split is empty")
    rows[0][0]  # a bad first row fails now, with its source and row number
    return rows


def datasets_module():
    try:
        import datasets
    except ImportError:
        raise GymError("data=hf needs the datasets package: pip install 'gym-core[hf]'"
                       ) from None
    return datasets


def _open(src, cfg, where):
    """The train split and, when ``eval_split`` names one, the held-out split."""
    datasets = datasets_module()

    path = Path(str(src.path)).expanduser()
    kwargs: dict[str, Any] = {"cache_dir": cfg.cache_dir} if cfg.cache_dir else {}
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.Dataset):
                if src.eval_split:
                    raise GymError(f"{where} is one saved split, so data.eval_split="
                                   f"{src.eval_split} names nothing; drop it (data.test_size "
                                   "holds rows out)")
                return _limit(loaded, cfg), None
            return _pick(loaded, src, cfg, where)
        if path.is_file():
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise GymError(f"{where}: cannot tell the file's format from its suffix "
                               f"{path.suffix!r}; use one of {', '.join(BUILDERS)}")
            loaded = datasets.load_dataset(builder, data_files={"train": str(path)},
                                           streaming=cfg.streaming, **kwargs)
        elif path.exists():
            raise GymError(f"{where} is a folder but not one written by save_to_disk (no "
                           "dataset_dict.json or state.json): name its data files with "
                           "data.path=parquet data.data_files=...")
        else:
            data_files = src.data_files
            if data_files is not None and not isinstance(data_files, (str, list, dict)):
                data_files = _plain(data_files)
            if src.path in set(BUILDERS.values()) and not data_files:
                raise GymError(f"{where} is a builder: name the files with data.data_files")
            if str(src.path).startswith((".", "/", "~")) and not data_files:
                raise GymError(f"{where} does not exist (looked in {path.resolve()})")
            loaded = datasets.load_dataset(str(src.path), src.subset, data_files=data_files,
                                           streaming=cfg.streaming, **kwargs)
    except GymError:
        raise
    except Exception as exc:  # datasets raises many kinds; each becomes one line
        raise GymError(f"{where}: {_explain(exc, src)}") from None
    return _pick(loaded, src, cfg, where)


def _plain(value):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value)


def _pick(loaded, src, cfg, where):
    names = list(loaded.keys())
    if src.split not in loaded:
        raise GymError(f"{where} has no split {src.split!r} (it has {', '.join(names)}); "
                       "set data.split")
    train = _limit(loaded[src.split], cfg)
    if src.eval_split:
        if src.eval_split not in loaded:
            raise GymError(f"{where} has no split {src.eval_split!r} for data.eval_split "
                           f"(it has {', '.join(names)}); or drop it and use data.test_size")
        return train, _limit(loaded[src.eval_split], cfg)
    return train, None


def _limit(ds, cfg):
    """``data.max_samples`` rows (streamed datasets: read only those)."""
    import datasets

    n = cfg.max_samples
    if isinstance(ds, datasets.IterableDataset):
        if n is None:
            raise GymError("data.streaming=true reads rows as they come: set "
                           "data.max_samples to how many rows to train and hold out from")
        try:
            rows = list(ds.take(n))
        except Exception as exc:
            raise GymError(f"data.path={cfg.path}: {_explain(exc, cfg)}") from None
        return datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({})
    if n is not None and n < len(ds):
        return ds.select(range(n))
    return ds


def _explain(exc: Exception, src) -> str:
    """One line for a ``datasets`` failure."""
    import datasets

    text = " ".join(str(exc).split()) or type(exc).__name__
    offline = datasets.config.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    cause = exc.__cause__ or exc.__context__
    if "arrow" in type(cause).__module__.lower() if cause else False:
        text = f"{text} ({' '.join(str(cause).split())})"
    empty = re.search(r'Instruction "(.+?)" corresponds to no data', text)
    if empty:
        return f"the split {empty.group(1)!r} is empty (it holds no rows)"
    if type(exc).__name__ in ("DatasetNotFoundError", "ConnectionError", "FileNotFoundError",
                              "LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        if offline:
            return (f"not in the local datasets cache and offline mode is on "
                    f"(HF_DATASETS_OFFLINE=1): {text[:200]}. Download it once where the hub "
                    "is reachable (datasets.load_dataset(...)), or save it with save_to_disk "
                    "and give that folder")
        return f"cannot be found: {text[:200]}"
    return f"cannot be read ({type(exc).__name__}: {text[:240]})"


def _rename(ds, src, where):
    mapping = dict(src.columns or {})
    if not mapping:
        return ds
    missing = [k for k in mapping if k not in ds.column_names]
    if missing:
        raise GymError(f"{where}: data.columns renames {', '.join(missing)}, which the data "
                       f"does not have (its columns: {', '.join(ds.column_names)})")
    clash = [v for k, v in mapping.items() if v in ds.column_names and v not in mapping]
    if clash:
        ds = ds.remove_columns(clash)
    return ds.rename_columns(mapping)


def _check_columns(ds, where) -> str:
    kind = detect_type(ds.column_names)
    if kind is None:
        known = "; ".join(f"{t}: {c}" for t, c in TYPE_COLUMNS.items())
        raise GymError(f"{where}: columns {', '.join(ds.column_names) or '(none)'} fit no "
                       f"dataset type ({known}); rename yours with data.columns="
                       "{yours:prompt,...}")
    return kind


def _check_features(ds, where) -> None:
    """Wrong column types, from the Arrow schema (no pass over the rows)."""
    features = getattr(ds, "features", None) or {}
    for name, feat in features.items():
        if name not in KNOWN:
            continue
        desc = _describe(feat)
        if name in TEXT_COLUMNS:
            ok = desc in ("string", "messages") or (name == "text" and desc == "string")
            if name == "messages" and desc != "messages":
                ok = False
            if not ok:
                raise GymError(f"{where}: column '{name}' holds {desc}, but it must be text "
                               + ("or " if name != "messages" else "as ")
                               + "a list of {role, content} messages")
        elif name == "label" and desc not in ("bool", "int", "string"):
            raise GymError(f"{where}: column 'label' holds {desc}, but it must be true/false")
        elif name == "system" and desc != "string":
            raise GymError(f"{where}: column 'system' holds {desc}, but it must be text")


def _describe(feat) -> str:
    import datasets

    if isinstance(feat, datasets.Value):
        dtype = feat.dtype
        if dtype in ("string", "large_string"):
            return "string"
        if dtype == "bool":
            return "bool"
        if dtype.startswith(("int", "uint")):
            return "int"
        return dtype
    inner = getattr(feat, "feature", None)
    if isinstance(feat, list) and feat:
        inner = feat[0]
    if inner is not None:
        if isinstance(inner, dict) and "content" in inner:
            return "messages"
        return f"a list of {_describe(inner)}"
    if isinstance(feat, dict):
        return "a struct"
    return type(feat).__name__


def _hold_out(train, src, cfg, where):
    """A seeded held-out split (``data.test_size``: a fraction below 1, else a count): the
    held-out table rows (sorted; the training :class:`Rows` skip them) and their dataset."""
    size = src.test_size
    n = len(train)
    count = int(size) if size >= 1 else max(1, int(n * size))
    if size <= 0 or count >= n:
        raise GymError(f"{where}: {n} rows are too few to hold out data.test_size={size}; "
                       "lower it or give data.eval_split")
    # a seeded sample of ``count`` rows (numpy draws it in memory of its size, Floyd's
    # method, where datasets' train_test_split permutes and indexes every row: 0.75 GB
    # on 13.8 M rows); the training rows are the rest of the table, read around it
    held = np.sort(np.random.default_rng(cfg.seed).choice(n, size=count, replace=False))
    return held, train.select(held)
