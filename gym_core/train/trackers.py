"""Experiment trackers (the ``logger`` family): where a run's metrics, config, summary and
final artifacts go besides its own folder.

``logger=[tensorboard,wandb,mlflow]`` selects several (the default is ``[tensorboard]``;
``logger=[]`` none); plugins add trackers through ``gym_add_loggers``. gym calls each
selected tracker, on the main process only:

1. ``start(cfg, run_dir, start_step)`` before the first step (the resolved config);
2. ``log_metrics(step, metrics)`` after every step (the row metrics.jsonl gets);
3. ``log_summary(summary, artifacts)`` once summary.json is written: the summary and the
   run's final artifacts (``summary``, ``final``, ``delta`` paths that exist);
4. ``close(ok)`` at the end, ``ok=False`` when the run failed or was interrupted.

metrics.jsonl in the run folder is the core's own record and is written whatever the
trackers; a tracker that fails stops the run with an error naming it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gym_core.base.errors import GymError


class Tracker:
    """Base of an experiment tracker; ``cfg`` is its ``logger.<name>`` config node."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def start(self, cfg: Any, run_dir: Path, start_step: int) -> None:
        """The run is about to train (``start_step`` > 0: it resumes from that step)."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """One optimizer step's metrics (finite numbers only)."""

    def log_summary(self, summary: dict[str, Any], artifacts: dict[str, Path]) -> None:
        """The run's summary.json content and its final artifacts."""

    def close(self, ok: bool = True) -> None:
        """Flush and release; ``ok=False``: the run failed or was interrupted."""


def flat_config(cfg: Any) -> dict[str, Any]:
    """The resolved config as ``{"algorithm.lr": 1e-5, ...}`` (what trackers take as
    parameters)."""
    from omegaconf import OmegaConf

    from gym_core.train.resume import flatten

    tree = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    return flatten(tree)


def flat_numbers(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's finite numbers as ``{"eval.after": 0.64, ...}`` (run-level metrics)."""
    return finite(flat_config(summary))


def finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Trackers:
    """The selected trackers of one run, called together; errors name the tracker."""

    def __init__(self, items: list[tuple[str, Tracker]]):
        self.items = items
        self.started = False

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.items]

    def _each(self, what: str, fn) -> None:
        for name, tracker in self.items:
            try:
                fn(tracker)
            except GymError:
                raise
            except Exception as exc:
                raise GymError(f"logger={name} failed in {what}: {type(exc).__name__}: "
                               f"{exc}") from exc

    def start(self, cfg, run_dir: Path, start_step: int) -> None:
        if self.started:
            return
        self.started = True
        self._each("start", lambda t: t.start(cfg, Path(run_dir), start_step))

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        row = finite(metrics)
        self._each("log_metrics", lambda t: t.log_metrics(step, row))

    def log_summary(self, summary: dict[str, Any], run_dir: Path) -> None:
        run_dir = Path(run_dir)
        candidates = {"summary": run_dir / "summary.json", "final": run_dir / "final"}
        delta = (summary.get("quant_stats") or {}).get("delta_file")
        if delta:
            candidates["delta"] = Path(delta)
        artifacts = {k: p for k, p in candidates.items() if p.exists()}
        self._each("log_summary", lambda t: t.log_summary(summary, artifacts))

    def close(self, ok: bool = True) -> None:
        errors = []
        for name, tracker in self.items:  # every tracker is closed, even after one fails
            try:
                tracker.close(ok)
            except Exception as exc:
                errors.append(f"logger={name} failed to close: {type(exc).__name__}: {exc}")
        self.items = []
        if errors and ok:
            raise GymError("; ".join(errors))


def open_trackers(cfg, plugins) -> Trackers:
    """The trackers ``cfg.logger`` selects (``trainer.tensorboard=false`` leaves
    TensorBoard out), built but not started."""
    from omegaconf import DictConfig

    section = cfg.get("logger") if isinstance(cfg, DictConfig) else None
    items = []
    for name in list(section or {}):
        if name == "tensorboard" and not cfg.trainer.get("tensorboard", True):
            continue
        node = section[name]
        kind = node.get("name", name) if isinstance(node, DictConfig) else name
        impl = plugins.component("logger", kind).load()
        items.append((kind, impl(node)))
    return Trackers(items)


def _fenced(text: str, lang: str = "") -> str:
    """``text`` as a Markdown code block (TensorBoard's Text tab renders Markdown)."""
    return f"```{lang}\n{text.rstrip()}\n```"


class TensorBoardTracker(Tracker):
    """TensorBoard in ``<run>/tensorboard``: the metrics as scalars, the resolved config
    and the summary (with the final artifacts' paths: they sit in the run folder beside
    it) in the Text tab. A resumed run purges the events after its checkpoint, so a redone
    step appears once."""

    writer = None

    def start(self, cfg, run_dir: Path, start_step: int) -> None:
        from omegaconf import OmegaConf
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("config", _fenced(OmegaConf.to_yaml(cfg, resolve=True), "yaml"),
                             start_step)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
        self.writer.flush()

    def log_summary(self, summary: dict[str, Any], artifacts: dict[str, Path]) -> None:
        if self.writer is None:
            return
        step = int(summary.get("steps") or 0)
        for k, v in flat_numbers({"eval": summary.get("eval") or {}}).items():
            self.writer.add_scalar(k.replace(".", "/", 1), v, step)
        self.writer.add_text("summary", _fenced(json.dumps(summary, indent=1, default=str),
                                                "json"), step)
        self.writer.add_text("artifacts", "\n".join(f"- {k}: `{p}`" for k, p in
                                                      artifacts.items()), step)
        self.writer.flush()

    def close(self, ok: bool = True) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
