"""Per-step metrics: metrics.jsonl (one JSON object per step), TensorBoard, progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path

from gym_core.base.errors import warn
from gym_core.base.files import atomic_path, disk_full, no_space


class MetricsLog:
    """The run's metrics from ``start_step`` on: rows of steps after it (written before
    the checkpoint the run resumes from was overtaken by a kill) are dropped from
    metrics.jsonl and purged from TensorBoard, so a redone step appears once."""

    def __init__(self, run_dir: Path, tensorboard: bool, start_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.truncate_after(start_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # events of steps > start_step in earlier files are dropped by readers
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        try:
            # one append per row: a kill leaves at most a torn last line, which the next
            # start drops (truncate_after)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        except OSError as exc:
            if disk_full(exc):
                raise no_space(self.path.parent) from None
            raise
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
            self.writer.flush()

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (written after the checkpoint a run resumes from), and a
        torn last line (a write cut short by a kill or power loss), with a warning;
        rewritten atomically, so a kill here loses nothing."""
        if not self.path.is_file():
            return
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        if lines and not lines[-1].strip():
            lines.pop()  # the newline that ends the last row
        keep = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:
                    warn(f"{self.path}: dropped its torn last line ({len(line)} bytes of a "
                         "row whose write was cut short); that step is redone")
                    continue
                warn(f"{self.path}:{i + 1} is not a JSON row; kept as it is")
                keep.append(line)
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
                continue
            keep.append(line)
        data = b"".join(ln + b"\n" for ln in keep)
        if data != raw:
            with atomic_path(self.path) as tmp:  # never emptied, whatever happens here
                tmp.write_bytes(data)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
