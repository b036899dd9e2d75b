"""What a run is, kept beside it, so that running its ``run.name`` again continues the
same run or says why it cannot.

``<run dir>/run.json`` records, at each start that passed the checks, the config the run
trains with (``config``) and a digest of its data (``data_sha256``). A later start
compares against it:

- what defines the run (the algorithm, the model and its adapter, the data config and
  the data's content) must not change: the checkpoint's weights, optimizer state and data
  position mean nothing under another; a change is refused, naming each key with both
  values;
- every other setting may change, and is applied from the resumed step on (the learning
  rate, betas and weight decay included: :func:`gym_core.train.loop.train` sets them on the
  restored optimizer); the start prints one line listing what changed.

The ``.hydra/`` record of the config is written here too, after the checks (gym sets
``hydra.output_subdir`` to null so that Hydra does not write it before them): a refused
or failed start leaves the run's record as it was.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gym_core.base.errors import GymError
from gym_core.base.files import write_json, write_text

RECORD = "run.json"
#: model settings that only say where things are cached, not what the model is
_MODEL_LOCATION = ("cache_dir",)


def defining(cfg: DictConfig) -> dict[str, Any]:
    """The settings that make a run what it is, flattened (``model.lora.r`` ...)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for key in _MODEL_LOCATION:
        model.pop(key, None)
    if model.get("source") != "tiny":
        model.pop("tiny", None)
    if model.get("finetune") != "lora":
        model.pop("lora", None)
    return flatten({"algorithm": {"name": cfg.algorithm.name}, "model": model,
                    "data": OmegaConf.to_container(cfg.data, resolve=True)})


def settings(cfg: DictConfig) -> dict[str, Any]:
    """Every other setting, flattened; the run's name and root are where, not what."""
    full = flatten(OmegaConf.to_container(cfg, resolve=True))
    fixed = defining(cfg)
    return {k: v for k, v in full.items()
            if k not in fixed and not k.startswith(("run.", "hydra.", "model."))}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def data_digest(train: list, test: list) -> str:
    """sha256 of the task's examples (train and test), as the run sees them."""
    h = hashlib.sha256()
    for part in (train, test):
        if hasattr(part, "digest"):  # a lazily read dataset: its fingerprint
            h.update(part.digest().encode("utf-8") + b"\0")
            continue
        for row in part:  # row by row: no copy of a large dataset as one string
            h.update(json.dumps(row, sort_keys=True, default=str).encode("utf-8") + b"\n")
        h.update(b"\0")
    return h.hexdigest()


def read_record(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("defines"), dict):
            raise ValueError("no 'defines' map")
    except (ValueError, UnicodeDecodeError) as exc:
        raise GymError(f"{path} is unreadable ({exc}): it records what this run is; restore "
                       "it from a backup, or delete it to skip the check that a resumed "
                       "run keeps its algorithm, model and data") from None
    return record


def trained_steps(run_dir: Path) -> int:
    """The step of the run's newest complete checkpoint (0: none). Reads folder names
    only (gym_core.train.checkpoint's layout: checkpoints/step-N/checkpoint.json)."""
    import re

    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return 0
    steps = [int(m.group(1)) for p in folder.iterdir()
             if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / "checkpoint.json").is_file()]
    return max(steps, default=0)


def recorded_threads(run_dir: Path) -> int | None:
    """The thread count an existing run computes with (its run.json's ``threads``)."""
    try:
        record = read_record(run_dir)
    except GymError:
        return None  # the resume check names the unreadable file
    value = (record or {}).get("threads")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _show(v: Any) -> str:
    return "unset" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def check(cfg: DictConfig, run_dir: Path, digest: str | None = None) -> list[str]:
    """Refuse a start that would change what the existing run in ``run_dir`` is (raises
    :class:`GymError`); return the other settings that change (``"key old -> new"``).
    Nothing to compare (a new run, or one from before run.json) returns []. A
    ``trainer.max_steps`` below the steps the run has already taken is refused too: a run
    does not shrink."""
    done = trained_steps(run_dir)
    if done > cfg.trainer.max_steps:
        raise GymError(f"{run_dir} has already trained {done} steps, and trainer.max_steps="
                       f"{cfg.trainer.max_steps} is below that (a run does not shrink): give "
                       f"trainer.max_steps={done} or more to continue it, or another run.name "
                       "for a new run")
    record = read_record(run_dir)
    if record is None:
        return []
    old, new = record["defines"], defining(cfg)
    diffs = [f"{k} {_show(old.get(k))} -> {_show(new.get(k))}"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if digest is not None and record.get("data_sha256") not in (None, digest):
        diffs.append("the data's content (its examples changed since the run started)")
    if diffs:
        name = Path(run_dir).name
        raise GymError(
            f"{run_dir} is an existing run, and this command changes what it is: "
            f"{'; '.join(diffs)}. A run keeps its algorithm, model, adapter and data; "
            f"start a new run with another run.name, or start one from this run's weights "
            f"with model.init={Path(cfg.run.root) / name}")
    before = record.get("settings") or {}
    now = settings(cfg)
    return [f"{k} {_show(before.get(k))} -> {_show(now.get(k))}"
            for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]


def record(cfg: DictConfig, run_dir: Path, digest: str | None) -> None:
    """Write run.json and the ``.hydra/`` record of this start (atomically)."""
    from gym_core import __version__
    from gym_core.base.threads import in_use

    run_dir = Path(run_dir)
    # threads: the count this run computes with, kept by every resume (gym_core/base/threads.py)
    write_json(run_dir / RECORD, {"gym_version": __version__, "defines": defining(cfg),
                                  "settings": settings(cfg), "data_sha256": digest,
                                  "threads": in_use()})
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.instance().cfg
        out = Path(HydraConfig.get().runtime.output_dir) / ".hydra"
        write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
        write_text(out / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))
        write_text(out / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))
