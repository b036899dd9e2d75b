"""Checks of a composed config that need nothing loaded (no torch): run by
``python -m gym_core`` before Hydra starts the job, and again by
:func:`gym_core.train.job.run_job` for in-process callers. A value that would fail (or
silently do nothing) deep in the run is refused here in one line, before anything is
written."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from gym_core.base.errors import GymError

SCHEDULES = ("constant", "linear", "cosine")


#: what to say for a required value that is missing, where a hint helps
_NEEDS = {
    "data.train_file": "data=jsonl needs data.train_file=PATH (a JSONL file of your rows; "
                       "docs/guide.md shows the formats)",
    "soup.inputs": "a soup needs soup.inputs=[a,b,...]: two or more delta files, or run "
                   "directories holding one delta/*.safetensors each",
}


def check_missing(cfg: DictConfig) -> None:
    """Refuse a config with a required value left unset (``???``)."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        key = missing[0]
        raise GymError(_NEEDS.get(key, f"{key} has no value and needs one: add {key}=... to "
                                       "the command"))


def preflight(cfg: DictConfig) -> None:
    check_missing(cfg)
    t, a = cfg.trainer, cfg.algorithm
    for key, value, low in (("trainer.max_steps", t.max_steps, 1),
                            ("trainer.batch_size", t.batch_size, 1),
                            ("trainer.grad_accum", t.grad_accum, 1),
                            ("trainer.eval_batch_size", t.eval_batch_size, 1),
                            ("trainer.warmup_steps", t.warmup_steps, 0),
                            ("trainer.save_every", t.save_every, 0)):
        if value < low:
            raise GymError(f"{key}={value} must be at least {low}")
    if t.lr_scheduler not in SCHEDULES:
        raise GymError(f"trainer.lr_scheduler={t.lr_scheduler!r} is not one of "
                       f"{', '.join(SCHEDULES)}")
    if not (math.isfinite(a.lr) and a.lr >= 0):
        raise GymError(f"algorithm.lr={a.lr} must be a finite number >= 0")
    for key in ("max_prompt_length", "max_completion_length"):
        if key in a and a[key] < 1:
            raise GymError(f"algorithm.{key}={a[key]} must be at least 1 (tokens)")
    if cfg.model.source == "tiny":
        check_tiny_shape(cfg.model.tiny)
    from gym_core.env.setup import check_env_config

    check_env_config(cfg)  # env=...: an online algorithm, limits in range (docs/agents.md)


def check_tiny_shape(cfg) -> None:
    """Refuse a tiny-model shape the attention layers cannot take (it would fail deep in
    the first forward pass, or build a model of another shape)."""
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads")
    for name in sizes:
        if getattr(cfg, name) < 1:
            raise GymError(f"model.tiny.{name}={getattr(cfg, name)} must be at least 1")
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if cfg.hidden_size % heads:
        raise GymError(f"model.tiny.hidden_size={cfg.hidden_size} is not a multiple of "
                       f"model.tiny.num_attention_heads={heads}")
    if heads % kv:
        raise GymError(f"model.tiny.num_attention_heads={heads} is not a multiple of "
                       f"model.tiny.num_key_value_heads={kv} (each key/value head serves a "
                       "whole group of query heads)")
    if (cfg.hidden_size // heads) % 2:
        raise GymError(f"model.tiny.hidden_size / num_attention_heads = "
                       f"{cfg.hidden_size // heads} must be even (rotary embeddings rotate "
                       "pairs of dimensions)")
