"""The W&B tracker: one W&B run per gym run folder (a resumed gym run continues the same
W&B run), its files under ``<run>/wandb``."""

from __future__ import annotations

import hashlib
import netrc
import os
from pathlib import Path
from typing import Any

from gym_core.api import GymError, Tracker, flat_numbers

MODES = ("online", "offline", "disabled")


def has_key() -> bool:
    """A W&B API key is set: ``WANDB_API_KEY``, or ``wandb login``'s netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def run_id(run_dir: Path) -> str:
    """A stable W&B run id for a run folder: its name and a hash of its absolute path."""
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in run_dir.name)[:48]
    return f"{safe}-{digest}"


class WandbTracker(Tracker):
    run = None

    def start(self, cfg, run_dir: Path, start_step: int) -> None:
        try:
            import wandb
        except ImportError:
            raise GymError("logger=wandb needs the wandb library: pip install "
                           "'gym-core[wandb]' (or pip install wandb)") from None
        from omegaconf import OmegaConf

        mode = self.cfg.mode or os.environ.get("WANDB_MODE") or (
            "online" if has_key() else "offline")
        if mode not in MODES:
            raise GymError(f"logger.wandb.mode={mode!r} is not one of {', '.join(MODES)}")
        if mode == "offline" and not self.cfg.mode and not os.environ.get("WANDB_MODE"):
            print(f"gym: wandb: no API key set: logging offline to {run_dir / 'wandb'} "
                  "(`wandb sync` uploads it; WANDB_API_KEY or `wandb login` logs online)")
        self.wandb = wandb
        self.run = wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, group=self.cfg.group,
            tags=list(self.cfg.tags) or None, name=run_dir.name, id=run_id(run_dir),
            resume="allow", dir=str(run_dir), mode=mode,
            config=OmegaConf.to_container(cfg, resolve=True),
            settings=wandb.Settings(console="off", quiet=True),
            reinit="create_new",
        )

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_summary(self, summary: dict[str, Any], artifacts: dict[str, Path]) -> None:
        if self.run is None:
            return
        self.run.summary.update(flat_numbers(summary))
        if not self.cfg.log_artifacts or not artifacts:
            return
        art = self.wandb.Artifact(f"{self.run.id}-result", type="model",
                                  metadata={"algorithm": summary.get("algorithm"),
                                            "quant": summary.get("quant")})
        for name, path in artifacts.items():
            if path.is_dir():
                art.add_dir(str(path), name=name)
            else:
                art.add_file(str(path), name=f"{name}/{path.name}")
        self.run.log_artifact(art)

    def close(self, ok: bool = True) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
