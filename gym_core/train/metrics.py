"""Per-step metrics: metrics.jsonl (one JSON object per step), the run's own record; the
experiment trackers (TensorBoard, W&B, MLflow: gym_core/train/trackers.py) get the same rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

from gym_core.base.errors import warn
from gym_core.base.files import atomic_path, disk_full, no_space


class MetricsLog:
    """The run's metrics from ``start_step`` on: rows of steps after it (written before
    the checkpoint the run resumes from was overtaken by a kill) are dropped from
    metrics.jsonl (and purged by the TensorBoard tracker), so a redone step appears once.
    ``trackers`` (a :class:`gym_core.train.trackers.Trackers`) get every row too."""

    def __init__(self, run_dir: Path, start_step: int = 0, trackers=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.truncate_after(start_step)
        self.trackers = trackers

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
        if self.trackers is not None:
            self.trackers.log_metrics(step, metrics)

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
        """Nothing stays open between rows; the trackers are closed by their owner."""


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
