"""Config schemas of the experiment trackers (the ``logger`` family): ``logger=[a,b]``
selects several at once, each under ``logger.<name>`` (docs/plugins.md, gym_add_loggers).
Cheap to import (no torch), like :mod:`gym_core.config.schema`."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class LoggerConfig:
    """Base of every ``logger=<name>`` option."""

    name: str = MISSING


@dataclass
class TensorBoardConfig(LoggerConfig):
    """TensorBoard event files in ``<run>/tensorboard`` (``tensorboard --logdir runs``).
    ``trainer.tensorboard=false`` turns it off too."""

    name: str = "tensorboard"
