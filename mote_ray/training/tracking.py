"""Experiment tracking from rank 0: MLflow (a local file store by default) and W&B when configured.

MLflow's client API is used directly (not the fluent `mlflow.start_run`), so a resumed run logs
into the same MLflow run (its id is kept in the checkpoint). We depend on `mlflow-skinny` (client
and file store, no server): a file store is offline and `mlflow ui --backend-store-uri URI`
(full `mlflow` package) shows it. MLflow 3 keeps its file store in maintenance mode and refuses it
unless MLFLOW_ALLOW_FILE_STORE is set; a local directory is still the only offline store that
needs no database, so we set it for `file:` URIs. W&B is imported only when a project is set.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # MLflow tracking URI; "default" = a file store at OUT/mlruns; null = off.
    mlflow: str | None = "default"
    wandb: str | None = None  # W&B project; null = off
    experiment: str = "mote-ray"


def resolve_mlflow_uri(uri: str | None, out: Path) -> str | None:
    if uri == "default":
        return (Path(out).resolve() / "mlruns").as_uri()
    if uri and "://" not in uri and not uri.startswith("file:"):
        return Path(uri).resolve().as_uri()
    return uri


class Tracker:
    """Logs metrics dicts (numbers only) to the configured backends; a no-op off rank 0."""

    def __init__(self, cfg: dict, active: bool, run_name: str, run_id: str | None = None, params: dict | None = None):
        self.active, self.run_id, self._client, self._wandb = active, run_id, None, None
        if not active:
            return
        uri = cfg.get("mlflow")
        if uri:
            if uri.startswith("file:"):
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(uri)
            if self.run_id is None:
                exp = self._client.get_experiment_by_name(cfg.get("experiment", "mote-ray"))
                exp_id = exp.experiment_id if exp else self._client.create_experiment(cfg.get("experiment", "mote-ray"))
                run = self._client.create_run(exp_id, run_name=run_name)
                self.run_id = run.info.run_id
                for k, v in (params or {}).items():
                    self._client.log_param(self.run_id, k, str(v)[:500])
        if cfg.get("wandb"):
            import wandb  # optional: only when configured

            self._wandb = wandb.init(project=cfg["wandb"], name=run_name, id=self.run_id, resume="allow",
                                     config=params or {})

    def log(self, metrics: dict, step: int) -> None:
        if not self.active:
            return
        nums = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self._client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in nums.items()])
        if self._wandb is not None:
            self._wandb.log(nums, step=step)

    def finish(self) -> None:
        if not self.active:
            return
        if self._client is not None:
            self._client.set_terminated(self.run_id)
        if self._wandb is not None:
            self._wandb.finish()
