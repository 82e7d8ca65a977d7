"""Which Ray hirl_ray talks to: the cluster it was given, or the local one it started; never a
guess.

Ray looks for "its" cluster in ``RAY_ADDRESS``, then ``/tmp/ray/ray_current_cluster`` (written
by ``ray start``), then among the GCS processes running on the machine. With two local
instances (a sweep and a fit, or the test suite's own) the last step fails, and code that asks
without an address, such as Ray Train's placement-group cleaner querying the state API, floods
the console with ``ConnectionError: Found multiple active Ray instances``. So a given cluster
is joined by its address, and a local Ray is started on a GCS port chosen here, with
``RAY_ADDRESS`` naming it in the environment of every task and actor of the job (the job's
``runtime_env``), so that Ray's own helpers find it too.

Without the dashboard (``HIRL_RAY_DASHBOARD=0``) there is no State API at all, and the same
cleaner warns that it "Failed to query Ray Train Controller actor state" every few seconds for
the whole run; a ``worker_process_setup_hook`` (:func:`quiet_without_state_api`) drops exactly
that line in every worker of the job. Stopped trials' placement groups are freed by
:class:`hirl_ray.sweep.trial.FreeStoppedTrials` instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray

from hirl_ray.train import ray_compat

#: Ray Train's placement-group cleaner, and the warning it repeats without a State API.
_CLEANER_LOGGER = ray_compat.PLACEMENT_GROUP_CLEANER_LOGGER
_CLEANER_WARNING = "Failed to query Ray Train Controller actor state"


class _DropCleanerWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_CLEANER_WARNING)


def quiet_without_state_api() -> None:
    """Worker setup hook (no dashboard): drop the cleaner's repeated State API warning."""
    logger = logging.getLogger(_CLEANER_LOGGER)
    if not any(isinstance(f, _DropCleanerWarning) for f in logger.filters):
        logger.addFilter(_DropCleanerWarning())


#: Read by Ray's head node when it starts its GCS server (``ray._private.node``).
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"
ADDRESS_ENV = "RAY_ADDRESS"


@dataclass(frozen=True)
class RayStart:
    """A ``ray.init`` call: its keyword arguments, and environment variables to set while it
    runs (the Ray processes it spawns inherit them)."""

    kwargs: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def local(self) -> bool:
        return self.kwargs["address"] == "local"


def plan_ray_start(environ: Mapping[str, str], gcs_port: int, *, num_cpus: int | None = None,
                   dashboard: bool = True, dashboard_host: str | None = None,
                   log_to_driver: bool = True) -> RayStart:
    """The ``ray.init`` call for this environment (pure; :func:`connect` makes it).

    ``RAY_ADDRESS`` set: join that cluster by its address. Otherwise start a local Ray whose
    GCS listens on ``gcs_port`` (``RAY_GCS_SERVER_PORT`` wins when the user set it), with
    ``address="local"`` so that a ``ray start`` elsewhere on the machine is never joined by
    accident, and ``RAY_ADDRESS`` pointing at it in every task and actor of the job.
    """
    common: dict[str, Any] = {"namespace": "hirl_ray", "logging_level": logging.WARNING,
                              "log_to_driver": log_to_driver}
    given = environ.get(ADDRESS_ENV)
    if given:
        return RayStart({"address": given, **common})
    port = int(environ.get(GCS_PORT_ENV) or gcs_port)
    runtime_env: dict[str, Any] = {"env_vars": {ADDRESS_ENV: f"127.0.0.1:{port}"}}
    if not dashboard:
        runtime_env["worker_process_setup_hook"] = \
            f"{quiet_without_state_api.__module__}.{quiet_without_state_api.__name__}"
    kwargs = {"address": "local", **common, "num_cpus": num_cpus, "include_dashboard": dashboard,
              "runtime_env": runtime_env}
    if dashboard_host is not None:
        kwargs["dashboard_host"] = dashboard_host
    return RayStart(kwargs, {GCS_PORT_ENV: str(port)})


def free_port() -> int:
    """A TCP port nothing listens on now (the GCS binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def connect(**options: Any) -> Any:
    """Join ``RAY_ADDRESS``'s cluster or start a local Ray (see :func:`plan_ray_start` for
    ``options``); ``ray.init``'s context, or ``None`` when this process is already connected
    (to a Ray it was given: the caller's own ``ray.init``)."""
    if ray.is_initialized():
        return None
    start = plan_ray_start(os.environ, free_port(), **options)
    with _environment(start.env):
        return ray.init(**start.kwargs)
