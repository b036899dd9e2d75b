"""Pipelines of runs: a run that starts where an earlier one ended (``model.init=runs/<name>``).
This module reads and checks the records (cheap); :func:`gym_core.model.policy.load_start` loads
the weights.

The earlier run's result becomes this run's starting weights *and* its reference policy,
as TRL does when it is handed an SFT model: a LoRA run's adapter is merged into the base
weights (in fp32) and a fresh adapter attached, so disabling the adapter gives the earlier
result; a full fine-tune's final weights are loaded as they are. A chain of several runs
is rebuilt stage by stage from the base model.

Every run records what it was trained on in ``final/gym.json`` (the base model, the
algorithm, the chain of runs it started from); a run without final weights, or made on
another base model, is refused before anything is loaded or written. The delta a run
quantizes is always against the original base model, so every variant in a pipeline is
one delta file on the shared base (docs/guide.md, "Pipelines").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gym_core.base.errors import GymError

RECORD = "gym.json"  # in <run>/final/, written last by gym_core.model.policy.save_final


def base_identity(model_cfg) -> dict[str, Any]:
    """Which base model a ``model`` config loads (the fields that change the weights)."""
    if model_cfg.source == "tiny":
        from omegaconf import OmegaConf

        return {"source": "tiny", "tiny": OmegaConf.to_container(model_cfg.tiny, resolve=True)}
    if model_cfg.source == "local":
        return {"source": "local", "path": str(Path(model_cfg.path).expanduser().resolve())}
    return {"source": model_cfg.source}


def identity_digest(ident: dict[str, Any]) -> str:
    """A short fingerprint of a :func:`base_identity` (what ``gym_core.serve`` reports)."""
    import hashlib

    return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def describe_identity(ident: dict[str, Any]) -> str:
    if ident.get("source") == "local":
        return f"model=local model.path={ident.get('path')}"
    if ident.get("source") == "tiny":
        return f"model=tiny {ident.get('tiny')}"
    return f"model={ident.get('source')}"


def read_stage(init: str) -> dict[str, Any]:
    """The record of the finished run ``init`` (a run directory): ``{"run", "lora",
    "base", "algorithm", "chain"}``. Raises :class:`GymError` naming ``model.init`` when
    the directory holds no final weights."""
    run = Path(init).expanduser()
    final = run / "final"
    if not run.is_dir():
        raise GymError(f"model.init={init!r}: no such run directory ({run.resolve()})")
    record_file = final / RECORD
    if not record_file.is_file():
        hint = ("it has checkpoints but did not finish: run it again with the same run.name "
                "to finish it" if (run / "checkpoints").is_dir() else "is it a gym run?")
        raise GymError(f"model.init={init!r}: {final} holds no final weights ({hint})")
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError) as exc:
        raise GymError(f"model.init={init!r}: {record_file} is unreadable ({exc})") from None
    lora = bool(record.get("lora"))
    weights = final / ("adapter_model.safetensors" if lora else "model.safetensors")
    if not weights.is_file():
        raise GymError(f"model.init={init!r}: {final} holds no final weights ({weights.name} "
                       "is missing)")
    base = record.get("base") or hydra_base(run)
    if base is None:
        raise GymError(f"model.init={init!r}: the run does not record which base model it was "
                       f"trained on (no 'base' in {record_file}, no .hydra/config.yaml)")
    return {"run": str(run.resolve()), "lora": lora, "base": base,
            "algorithm": record.get("algorithm"), "chain": list(record.get("chain") or [])}


def recorded_base(run: Path) -> dict[str, Any] | None:
    """The base model a run (finished or not) was trained on: its ``final/gym.json``
    record, else Hydra's copy of its config; None when neither says."""
    record_file = Path(run) / "final" / RECORD
    if record_file.is_file():
        try:
            base = json.loads(record_file.read_text()).get("base")
        except (OSError, ValueError):
            base = None
        if base:
            return base
    try:
        return hydra_base(Path(run))
    except Exception:  # a damaged YAML file: the base is not known
        return None


def hydra_base(run: Path) -> dict[str, Any] | None:
    """The base model of a run that predates the record, from Hydra's copy of its config."""
    path = run / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    from gym_core.config.schema import ModelConfig

    model = OmegaConf.merge(OmegaConf.structured(ModelConfig),
                            OmegaConf.load(path).get("model", {}))
    return base_identity(model)


def check_init(model_cfg) -> list[dict[str, Any]] | None:
    """The chain of runs this run starts from (oldest first, the one ``model.init``
    names last), checked: each has final weights and was trained on this run's base
    model. None without ``model.init``. Cheap: reads small JSON files only."""
    init = getattr(model_cfg, "init", None)
    if not init:
        return None
    stage = read_stage(init)
    mine = base_identity(model_cfg)
    if stage["base"] != mine:
        raise GymError(
            f"model.init={init!r} was trained on another base model "
            f"({describe_identity(stage['base'])}) than this run's "
            f"({describe_identity(mine)}): start from a run of the same model")
    for earlier in stage["chain"]:
        if not Path(earlier["run"], "final", RECORD).is_file():
            raise GymError(f"model.init={init!r} started from {earlier['run']}, whose final "
                           "weights are gone: the chain cannot be rebuilt")
    link = {k: stage[k] for k in ("run", "algorithm", "lora")}
    return [*stage["chain"], link]


def recorded_chain(final: Path) -> list[dict[str, Any]]:
    """The chain of runs a finished run started from (oldest first; empty for a run
    trained from the base), as its ``final/gym.json`` records it."""
    record_file = Path(final) / RECORD
    if not record_file.is_file():
        return []
    chain = list(json.loads(record_file.read_text()).get("chain") or [])
    for earlier in chain:
        if not (Path(earlier["run"]) / "final" / RECORD).is_file():
            raise GymError(f"{final.parent} started from {earlier['run']}, whose final weights "
                           "are gone: its model cannot be rebuilt")
    return chain

