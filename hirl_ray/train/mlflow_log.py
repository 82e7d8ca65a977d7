"""An MLflow run for a fit (``observe.mlflow``): the same scalars and tree picture as TensorBoard.

Rank 0's :class:`~hirl_ray.train.observe.RunObserver` writes to :class:`MlflowLog` exactly what
it writes to TensorBoard (step scalars every ``observe.every_steps`` steps against the global
step, epoch scalars against the epoch, the prototype tree at each new hierarchy version) and
the run's config as parameters (secrets redacted). The MLflow run id is kept in
``<run>/mlflow.json``: a resumed fit, or rank 0 restarted by Ray after a failure, continues the
same MLflow run. A tracking server that stops answering costs a warning, never the run.
Sweeps get one MLflow run per trial (each trial is a fit). No Ray here.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hirl_ray import storage
from hirl_ray.config import ConfigError, ExperimentConfig
from hirl_ray.logs import get_logger, redact, redact_text
from hirl_ray.runs import LAYOUT
from hirl_ray.train.observe import Tracker, curve_values

log = get_logger(__name__)

#: MLflow's limits per ``log_batch`` request.
MAX_PARAMS, MAX_METRICS = 100, 1000
#: How a fit ends, as MLflow run statuses.
END_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


def tracking_uri(cfg: ExperimentConfig) -> str:
    """``observe.mlflow_uri``, else ``MLFLOW_TRACKING_URI``; a one-line error without either."""
    uri = cfg.observe.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise ConfigError("observe.mlflow is on but no tracking URI is set: set "
                          "observe.mlflow_uri (http://host:5000, sqlite:////abs/path/mlflow.db) "
                          "or MLFLOW_TRACKING_URI")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raise ConfigError(f"observe.mlflow_uri={uri}: a relative sqlite path resolves in each "
                          "Ray worker's own folder; give an absolute one (sqlite:////abs/mlflow.db)")
    return uri


def check_mlflow(cfg: ExperimentConfig) -> None:
    """Before Ray starts: mlflow is installed, the server answers and the experiment exists
    (created if missing). Raises a one-line :class:`ConfigError` naming the key."""
    if not cfg.observe.mlflow:
        return
    uri = tracking_uri(cfg)
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ConfigError("observe.mlflow is on but the mlflow package is not installed: "
                          "pip install 'hirl_ray[mlflow]' (on every node of a cluster)") from None
    try:
        experiment_id(MlflowClient(tracking_uri=uri), cfg.observe.mlflow_experiment)
    except Exception as e:  # noqa: BLE001 - MLflow raises many kinds; all mean the same here
        first = redact_text(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
        raise ConfigError(f"observe.mlflow_uri={redact_text(uri)}: MLflow did not answer "
                          f"({type(e).__name__}: {first[:200]}); check the URI or set "
                          "observe.mlflow=false") from None


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside an sqlite store's file
    (``<folder>/mlartifacts``); a server decides for itself (``None``). MLflow's own default
    for a database store is ``./mlruns``, relative to each Ray worker's working folder."""
    if uri.startswith("sqlite:////"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``, created when missing (two ranks or trials may race)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(
            client.tracking_uri))
    except Exception:  # noqa: BLE001 - created meanwhile by another trial
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested (redacted) config as MLflow parameters: ``{"data.name": "synthetic", ...}``."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


class MlflowLog(Tracker):
    """One MLflow run of a fit; the :class:`~hirl_ray.train.observe.Board` interface.

    Args:
        cfg: The experiment (``observe.mlflow_*``, ``storage.name``; logged as parameters).
        run_dir: The run folder; ``mlflow.json`` there names the MLflow run to continue.
    """

    kind, name = "mlflow", "MLflow"

    def __init__(self, cfg: ExperimentConfig, run_dir: str) -> None:
        from mlflow import MlflowClient

        uri = tracking_uri(cfg)
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = self._continue(run_dir)
        if self.run_id is None:
            exp = experiment_id(self.client, cfg.observe.mlflow_experiment)
            run = self.client.create_run(exp, run_name=redact_text(cfg.storage.name),
                                         tags={"hirl_ray.run_dir": redact_text(run_dir),
                                               "hirl_ray.method": cfg.method.name})
            self.run_id = run.info.run_id
            params = flat_params(redact(cfg.to_dict()))
            self._params(params)
            storage.write_text(LAYOUT.mlflow_file(run_dir),
                               json.dumps({"run_id": self.run_id, "experiment_id": exp}))
        self.target = f"{redact_text(uri)} run {self.run_id}"

    def _continue(self, run_dir: str) -> str | None:
        """The run id of an earlier attempt of this fit on this server, reopened."""
        path = LAYOUT.mlflow_file(run_dir)
        if not storage.exists(path):
            return None
        run_id = json.loads(storage.read_text(path))["run_id"]
        try:
            self.client.update_run(run_id, status="RUNNING")
        except Exception as e:  # noqa: BLE001 - another server, or the run was deleted
            log.warning("MLflow run %s of %s not found on this server (%s); starting a new one",
                        run_id, run_dir, type(e).__name__)
            return None
        return run_id

    def _params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS])

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """``values`` at ``step`` in one request; non-finite and non-numbers are left out."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, v, now, int(step)) for tag, v in curve_values(values).items()]
        for i in range(0, len(metrics), MAX_METRICS):
            self._safely("metrics", lambda batch: self.client.log_batch(
                self.run_id, metrics=batch), metrics[i:i + MAX_METRICS])

    def figure(self, tag: str, figure: Any, step: int) -> None:
        """A matplotlib figure as the artifact ``<tag>_v<step>.png`` (the caller closes it)."""
        self._safely("a figure", self.client.log_figure, self.run_id, figure,
                     f"{tag}_v{step:04d}.png")

    def sync(self) -> None:
        """Nothing buffered: every call above is one request."""

    def close(self, state: str = "finished") -> None:
        """End the MLflow run: ``finished``, ``stopped`` (KILLED) or ``failed``."""
        self._safely("the end of the run", self.client.set_terminated, self.run_id,
                     END_STATUS.get(state, "FINISHED"))
