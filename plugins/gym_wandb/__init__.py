"""Weights & Biases as a gym experiment tracker: ``logger=[tensorboard,wandb]``.

Offline unless a key is set: with ``WANDB_API_KEY`` (or ``wandb login``) the run goes to
W&B's servers, otherwise to ``<run>/wandb/offline-run-*`` (``wandb sync`` uploads it
later); ``logger.wandb.mode`` or ``WANDB_MODE`` chooses explicitly. The library comes
with gym's ``wandb`` extra (``pip install 'gym-core[wandb]'``); docs/guide.md, "Experiment
trackers".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gym_core.api import LoggerConfig, hookimpl


@dataclass
class WandbConfig(LoggerConfig):
    name: str = "wandb"
    project: str = "gym"
    entity: str | None = None  # None: the key's default entity
    # online | offline | disabled; None: $WANDB_MODE, else online when a key is set
    # ($WANDB_API_KEY or `wandb login`), offline otherwise
    mode: str | None = None
    group: str | None = None  # W&B's run group (e.g. a sweep's name)
    tags: list[str] = field(default_factory=list)
    # the final adapter / model, the quantized delta and summary.json as a W&B artifact
    log_artifacts: bool = True


@hookimpl
def gym_add_loggers(registry):
    registry.add("wandb", WandbConfig, "gym_wandb.tracker:WandbTracker")
