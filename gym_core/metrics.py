"""Per-step metrics: metrics.jsonl (one JSON object per step), TensorBoard, progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path

from gym_core.files import write_text


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
            self.writer.flush()

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (written after the checkpoint a run resumes from)."""
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        write_text(self.path, "".join(ln + "\n" for ln in keep))  # atomic: never emptied

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
