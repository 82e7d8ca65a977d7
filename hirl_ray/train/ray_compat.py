"""Every use of Ray's private API, in one place, each guarded.

hirl_ray is tested against one Ray release (:data:`SUPPORTED_RAY`, the pin in
``pyproject.toml``). A few things it needs have no public API in that release; they are
reached only through the functions below, so that a Ray upgrade that moves one fails here with
:class:`RayCompatError` naming the symbol and the supported version, instead of an
``ImportError`` or ``AttributeError`` deep inside a sweep. Where the private access is cosmetic
(quietening a logger) a moved symbol is skipped instead.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from hirl_ray.logs import get_logger

log = get_logger(__name__)

#: The Ray release hirl_ray is tested with (``ray[...]==`` in pyproject.toml).
SUPPORTED_RAY = "2.60.0"

_CALLBACK_MODULE = "ray.train.v2._internal.execution.callback"
_CONTEXT_MODULE = "ray.train.v2._internal.execution.context"
#: Logger of Ray Train's placement-group cleaner (private module; its State API warning is
#: dropped when there is no dashboard, see hirl_ray.train.ray_cluster).
PLACEMENT_GROUP_CLEANER_LOGGER = \
    "ray.train.v2._internal.execution.controller.placement_group_cleaner"


class RayCompatError(RuntimeError):
    """The installed Ray moved a private symbol hirl_ray relies on."""


def _ray_version() -> str:
    try:
        import ray

        return ray.__version__
    except Exception:  # noqa: BLE001 - only for the message
        return "?"


def _moved(symbol: str, why: str) -> RayCompatError:
    return RayCompatError(
        f"ray {_ray_version()} moved {symbol} ({why}); hirl_ray supports "
        f"ray=={SUPPORTED_RAY}: pip install 'ray[train,tune,default]=={SUPPORTED_RAY}', or "
        "port hirl_ray/train/ray_compat.py")


def _import(module: str, attr: str, why: str) -> Any:
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        raise _moved(f"{module}.{attr}", why) from None


def worker_group_callback_base() -> type:
    """Ray Train V2's ``WorkerGroupCallback`` (base of a callback that sees the worker group).

    Private in Ray 2.60; a sweep subclasses it to record each trial's placement group.
    """
    return _import(_CALLBACK_MODULE, "WorkerGroupCallback",
                   "needed to record a Train run's placement group, ray #54305")


def worker_group_placement_group(worker_group: Any) -> Any:
    """The ``PlacementGroup`` of a Ray Train V2 worker group (private state)."""
    try:
        return worker_group.get_worker_group_state().placement_group_handle.placement_group
    except AttributeError:
        raise _moved("WorkerGroup.get_worker_group_state().placement_group_handle",
                     "needed to free a stopped trial's workers, ray #54305") from None


def experiment_analysis(result_grid: Any) -> Any:
    """Tune's ``ExperimentAnalysis`` behind a ``ResultGrid``: its ``trials`` carry each
    trial's status, which tells an interrupted sweep from a finished one."""
    try:
        return result_grid._experiment_analysis
    except AttributeError:
        raise _moved("ResultGrid._experiment_analysis",
                     "needed to count finished trials of a sweep") from None


def quiet_train_report_logger() -> None:
    """Silence Ray Train's INFO line for every ``ray.train.report``.

    Ray 2.60 logs each report through ``logging.getLogger(__file__)`` of its private context
    module, so ``LoggingConfig(log_level)`` misses it. Cosmetic: when that module moved, nothing
    is silenced (and nothing fails).
    """
    try:
        context = importlib.import_module(_CONTEXT_MODULE)
    except ImportError:
        log.debug("ray %s has no %s; Train report lines stay on", _ray_version(),
                  _CONTEXT_MODULE)
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
