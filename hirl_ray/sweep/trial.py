"""One Tune trial = one Ray Train V2 run: the Tune function, and the callbacks that wire them.

Train V2 + Tune (ray PR #49927): a Tune *function* builds the trial's experiment and fits a
``TorchTrainer`` through :func:`hirl_ray.train.ray_fit.train_on_ray`; a Train callback on the
controller forwards rank 0's per-epoch metrics to Tune, where ASHA sees them. Two of our own
additions:

* Every trial runs the ``label_free`` evaluation protocol each epoch on rank 0 (its criteria
  need no labels; :func:`hirl_ray.sweep.sampling.fixed_overrides` adds it), so any of them can
  be the sweep's metric and the report can rank them all against kNN where labels exist.
* A Tune-stopped Train V2 trial may keep its placement group (ray #54305; Ray's own cleaner needs
  the dashboard's State API and dies without it): :class:`RecordPlacementGroup` writes the run's
  placement group id into the trial folder and :class:`FreeStoppedTrials` removes it on the
  driver when Tune ends the trial, so the next trial gets the CPUs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.placement_group import PlacementGroup, remove_placement_group

from hirl_ray import storage
from hirl_ray.config import from_dict
from hirl_ray.logs import console, get_logger, redact
from hirl_ray.runs import LAYOUT, prepare_run
from hirl_ray.sweep.sampling import fixed_overrides, trial_overrides
from hirl_ray.sweep.space import TuneConfig
from hirl_ray.train import ray_compat
from hirl_ray.train.checkpoint import latest_checkpoint, newest_checkpoint_config, read_meta

log = get_logger(__name__)


class RecordPlacementGroup(ray_compat.worker_group_callback_base()):
    """Writes the worker group's placement group id to ``<run>/placement_group.txt``."""

    def __init__(self, run_dir: str) -> None:
        self._path = LAYOUT.placement_group_file(run_dir)

    def after_worker_group_start(self, worker_group) -> None:
        pg = ray_compat.worker_group_placement_group(worker_group)
        storage.write_text(self._path, pg.id.hex())


def free_placement_group(run_dir: Path) -> bool:
    """Remove the run's recorded placement group if it still holds resources."""
    path = Path(LAYOUT.placement_group_file(run_dir))
    if not path.is_file():
        return False
    pg_hex = path.read_text().strip()
    state = ray.util.placement_group_table().get(pg_hex, {}).get("state")
    if state in (None, "REMOVED"):
        return False
    remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex))))
    log.info("freed the Train workers of ended trial %s (placement group left behind, "
             "ray #54305)", run_dir.name)
    return True


class FreeStoppedTrials(ray.tune.Callback):
    """Driver-side Tune callback: free a finished/stopped trial's Train resources (#54305)."""

    def __init__(self, sweep_dir: str) -> None:
        self.sweep_dir = Path(sweep_dir)
        self.freed: list[str] = []

    def _free(self, trial) -> None:
        try:
            if free_placement_group(LAYOUT.trial_dir(self.sweep_dir, trial.trial_id)):
                self.freed.append(trial.trial_id)
        except Exception as e:  # never let cleanup break the sweep
            log.warning("could not free resources of trial %s: %s", trial.trial_id, e)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._free(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._free(trial)


def run_trial(params: dict[str, Any], *, base: dict[str, Any], spec: TuneConfig,
              sweep_dir: str, num_samples: int) -> None:
    """The Tune function: one HIRL fit with the sampled ``params`` (see module docstring).

    Each trial trains in ``<sweep>/trials/<trial_id>``; a restored sweep reruns an interrupted
    trial there, and :func:`train_on_ray` resumes it from its newest checkpoint.
    """
    from hirl_ray.train.ray_fit import train_on_ray

    console()  # this process is a Tune worker: show our lines through Ray's log forwarding
    params = params.get("grid_point", params)  # the grid searcher nests its point
    trial_id = ray.tune.get_context().get_trial_id()
    protocols = from_dict(base).eval.protocols
    overrides = {**trial_overrides(spec, params),
                 **fixed_overrides(spec, sweep_dir, trial_id, protocols)}
    cfg = from_dict(base, overrides)
    # Local: sweeps refuse remote storage up front.
    run_dir = prepare_run(cfg, newest_checkpoint_config)
    storage.write_text(LAYOUT.params_file(run_dir),
                       json.dumps(redact(params), indent=2, default=str))
    done = latest_checkpoint(run_dir)
    if done is not None and read_meta(done).epoch >= cfg.train.epochs:
        # Finished before an interruption but Tune never heard: report its last epoch.
        ray.tune.report({**read_meta(done).metrics, "checkpoint_path": str(done)})
        return
    train_on_ray(cfg, run_dir, num_samples,
                 callbacks=[TuneReportCallback(), RecordPlacementGroup(run_dir)])
