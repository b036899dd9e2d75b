"""A third-party tracker through gym_add_loggers (tests/test_trackers.py): it records each
call gym makes, in order, to <run>/calls.jsonl."""

from __future__ import annotations

import json
from dataclasses import dataclass

from gym_core.api import LoggerConfig, Tracker, hookimpl


@dataclass
class RecorderConfig(LoggerConfig):
    name: str = "recorder"
    file: str = "calls.jsonl"


class Recorder(Tracker):
    path = None

    def _write(self, row):
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def start(self, cfg, run_dir, start_step):
        self.path = run_dir / self.cfg.file
        self._write({"call": "start", "algorithm": cfg.algorithm.name, "start": start_step})

    def log_metrics(self, step, metrics):
        self._write({"call": "log_metrics", "step": step, "loss": metrics.get("loss")})

    def log_summary(self, summary, artifacts):
        self._write({"call": "log_summary", "steps": summary["steps"],
                     "artifacts": sorted(artifacts)})

    def close(self, ok=True):
        if self.path is not None:
            self._write({"call": "close", "ok": ok})


@hookimpl
def gym_add_loggers(registry):
    registry.add("recorder", RecorderConfig, Recorder)
