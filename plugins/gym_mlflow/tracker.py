"""The MLflow tracker, through ``MlflowClient`` (no global active run: several gym runs
in one process each keep their own)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from gym_core.api import GymError, Tracker, flat_config, flat_numbers

#: the MLflow run id of a gym run, kept in its folder so a resumed run continues it
ID_FILE = "mlflow_run_id"
MAX_PARAM = 6000  # MLflow's limit on a parameter value's length


class MlflowTracker(Tracker):
    client = None
    run_id = None

    def start(self, cfg, run_dir: Path, start_step: int) -> None:
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise GymError("logger=mlflow needs the mlflow library: pip install "
                           "'gym-core[mlflow]' (or pip install mlflow-skinny)") from None
        from omegaconf import OmegaConf

        self.Metric = Metric
        root = run_dir.parent.resolve()
        uri = (self.cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
               or f"sqlite:///{root / 'mlflow.db'}")
        local = uri.startswith("sqlite:") and not self.cfg.tracking_uri \
            and not os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            self.cfg.experiment,
            # beside the store, not in the current directory (MLflow's default)
            artifact_location=(root / "mlartifacts").as_uri() if local else None)
        id_file = run_dir / ID_FILE
        known = id_file.read_text().strip() if id_file.is_file() else None
        if known and self._exists(known):
            self.run_id = known
            self.client.update_run(known, status="RUNNING")
            return
        run = self.client.create_run(exp_id, run_name=run_dir.name,
                                     tags={"gym.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        id_file.write_text(self.run_id + "\n")
        params = [Param(k, str(v)[:MAX_PARAM]) for k, v in flat_config(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # deleted, or another tracking store
            return False

    def _metrics(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        rows = [self.Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(rows), 1000):
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._metrics(step, metrics)

    def log_summary(self, summary: dict[str, Any], artifacts: dict[str, Path]) -> None:
        if self.run_id is None:
            return
        self._metrics(int(summary.get("steps") or 0),
                      {f"summary.{k}": v for k, v in flat_numbers(summary).items()})
        self.client.log_dict(self.run_id, summary, "summary.json")
        if not self.cfg.log_artifacts:
            return
        for name, path in artifacts.items():
            if name == "summary":
                continue  # logged above
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), name)
            else:
                self.client.log_artifact(self.run_id, str(path), name)

    def close(self, ok: bool = True) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
            self.run_id = None
