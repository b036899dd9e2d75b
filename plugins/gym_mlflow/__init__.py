"""MLflow as a gym experiment tracker: ``logger=[tensorboard,mlflow]``.

Each gym run is one MLflow run (a resumed gym run continues it): the resolved config as
parameters and ``config.yaml``, every step's metrics, the summary's numbers and
``summary.json``, and the final adapter / model and quantized delta as artifacts. The
tracking store is ``logger.mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a
local store beside the runs: ``<run.root>/mlflow.db`` (SQLite, MLflow's recommended local
backend; its file store is in maintenance mode) with artifacts in ``<run.root>/mlartifacts``
(``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``). The library comes with gym's ``mlflow`` extra (``pip install
'gym-core[mlflow]'``); docs/guide.md, "Experiment trackers".
"""

from __future__ import annotations

from dataclasses import dataclass

from gym_core.api import LoggerConfig, hookimpl


@dataclass
class MlflowConfig(LoggerConfig):
    name: str = "mlflow"
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<run.root>/mlflow.db (a local store;
    # artifacts in <run.root>/mlartifacts)
    tracking_uri: str | None = None
    experiment: str = "gym"
    log_artifacts: bool = True


@hookimpl
def gym_add_loggers(registry):
    registry.add("mlflow", MlflowConfig, "gym_mlflow.tracker:MlflowTracker")
