"""A Weights & Biases run for a fit (``observe.wandb``): the same scalars and tree picture as
TensorBoard.

Rank 0's :class:`~hirl_ray.train.observe.RunObserver` writes to :class:`WandbLog` exactly what it
writes to TensorBoard: step scalars against ``global_step`` and epoch scalars (``epoch/*``,
``hierarchy/*``, ``rebuild/*``) against ``epoch``, each declared with ``define_metric`` so that
W&B's own ``_step`` (one per ``log`` call) never decides an x-axis; the prototype tree as an
image at each new hierarchy version; the run's config (secrets redacted). The run id is kept in
``<run>/wandb.json``: a resumed fit, or rank 0 restarted by Ray after a failure, continues the
same W&B run (``resume="allow"``). Online or offline is W&B's own setting (``WANDB_MODE``,
``wandb offline``); an offline run is uploaded later with ``wandb sync``. A logging error costs
a warning, never the run. Sweeps get one W&B run per trial. No Ray here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hirl_ray import storage
from hirl_ray.config import ConfigError, ExperimentConfig
from hirl_ray.logs import get_logger, redact, redact_text
from hirl_ray.runs import LAYOUT
from hirl_ray.train.observe import Tracker, curve_values

log = get_logger(__name__)

#: The x-axis metrics, and the prefixes of the observer's epoch scalars (all others are step).
STEP_AXIS, EPOCH_AXIS = "global_step", "epoch"
EPOCH_PREFIXES = ("epoch/", "hierarchy/", "rebuild/")


def wandb_settings() -> Any:
    """W&B's settings as ``wandb.init`` would see them now: the settings files (``wandb
    offline`` writes one), then ``WANDB_*`` variables. Read fresh: W&B's process-wide copy
    keeps the environment of its first use."""
    from wandb import Settings

    settings = Settings()
    config_dir = os.environ.get("WANDB_CONFIG_DIR")
    settings.settings_system = str(Path(config_dir).expanduser() / "settings" if config_dir
                                   else Path("~", ".config", "wandb", "settings").expanduser())
    settings.update_from_system_settings()
    settings.update_from_env_vars(dict(os.environ))
    return settings


def has_api_key(settings: Any) -> bool:
    """An API key for ``settings.base_url`` by W&B's own lookup (``WANDB_API_KEY``, an identity
    token file, ``~/.netrc``, the settings files); no network."""
    try:
        try:  # W&B's own lookup (wandb.login would ask the server); moved in wandb 0.2x
            from wandb.sdk.lib import wbauth
        except ImportError:
            from wandb.sdk.lib import apikey

            return bool(apikey.api_key(settings=settings))
        auth = wbauth.authenticate_session(host=settings.base_url, source="hirl_ray",
                                           prompt=False, update_session=False)
    except Exception:  # noqa: BLE001 - a malformed key is no key; W&B names it at init
        return False
    return auth is not None or bool(settings.api_key)


def check_wandb(cfg: ExperimentConfig) -> None:
    """Before Ray starts: wandb is installed and, unless W&B runs offline, an API key is
    configured. Raises a one-line :class:`ConfigError` naming the key."""
    if not cfg.observe.wandb:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("observe.wandb is on but the wandb package is not installed: "
                          "pip install 'hirl_ray[wandb]' (on every node of a cluster)") from None
    settings = wandb_settings()
    if settings.mode in ("offline", "dryrun", "disabled") or has_api_key(settings):
        return
    raise ConfigError(f"observe.wandb is on but no W&B API key is configured for "
                      f"{settings.base_url}: set WANDB_API_KEY (or run `wandb login` on every "
                      "node), or WANDB_MODE=offline to write the run locally and `wandb sync` it "
                      "later, or set observe.wandb=false")


class WandbLog(Tracker):
    """One W&B run of a fit; the :class:`~hirl_ray.train.observe.Board` interface.

    Args:
        cfg: The experiment (``observe.wandb_*``, ``storage.name``; logged as the config).
        run_dir: The run folder: ``wandb.json`` there names the W&B run to continue; W&B's
            local files go under it (a temporary folder when the run folder is remote).
        mode: ``online``/``offline``/``disabled`` (the driver's ``WANDB_MODE``); ``None``:
            W&B's own settings, read fresh (its process-wide copy keeps the environment of its
            first use).
    """

    kind, name = "wandb", "W&B"

    def __init__(self, cfg: ExperimentConfig, run_dir: str, mode: str | None = None) -> None:
        import wandb

        path = LAYOUT.wandb_file(run_dir)
        saved = json.loads(storage.read_text(path)) if storage.exists(path) else {}
        local = (tempfile.mkdtemp(prefix="hirl_ray_wandb_") if storage.is_remote(run_dir)
                 else storage.resolve(run_dir))
        Path(local).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.observe.wandb_project, entity=cfg.observe.wandb_entity or None,
            name=redact_text(cfg.storage.name), config=redact(cfg.to_dict()),
            tags=[cfg.method.name], dir=local, id=saved.get("run_id"), resume="allow",
            mode=mode or wandb_settings().mode,  # W&B's process-wide settings may be stale
            reinit="create_new",  # one run per fit, even with another open in this process
            settings=wandb.Settings(console="off"))  # rank 0's output already reaches Ray's log
        self.run_id = self.run.id
        if saved.get("run_id") != self.run_id:
            storage.write_text(path, json.dumps({"run_id": self.run_id,
                                                 "project": cfg.observe.wandb_project,
                                                 "entity": cfg.observe.wandb_entity}))
        for axis in (STEP_AXIS, EPOCH_AXIS):
            self.run.define_metric(axis)
        self._axis: dict[str, str] = {}  # metric -> its x-axis, declared on first use
        self._epoch = 0
        offline = self.run.settings._offline
        self.target = (f"offline {self.run.settings.sync_dir} (upload: wandb sync "
                       f"{self.run.settings.sync_dir})" if offline else
                       f"{self.run.url or ''} run {self.run_id}".strip())

    def _declare(self, names: Any, axis: str) -> None:
        for name in names:
            if self._axis.get(name) != axis:
                self.run.define_metric(name, step_metric=axis)
                self._axis[name] = axis

    def _log(self, axis: str, step: int, values: Mapping[str, Any]) -> None:
        self._declare(values, axis)
        self.run.log({axis: int(step), **values})

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """``values`` at ``step``: epoch scalars (``epoch/*``, ``hierarchy/*``, ``rebuild/*``)
        against ``epoch``, the others against ``global_step``; non-finite values left out."""
        numbers = curve_values(values)
        per_epoch = {k: v for k, v in numbers.items() if k.startswith(EPOCH_PREFIXES)}
        per_step = {k: v for k, v in numbers.items() if k not in per_epoch}
        if per_epoch:
            self._epoch = int(step)
            self._safely("metrics", self._log, EPOCH_AXIS, step, per_epoch)
        if per_step:
            self._safely("metrics", self._log, STEP_AXIS, step, per_step)

    def figure(self, tag: str, figure: Any, step: int) -> None:
        """A matplotlib figure as an image at the last logged epoch, captioned with ``step``
        (the hierarchy version); the caller closes it."""
        import wandb

        self._safely("a figure", lambda: self._log(
            EPOCH_AXIS, self._epoch, {tag: wandb.Image(figure, caption=f"v{step}")}))

    def sync(self) -> None:
        """Nothing to do: W&B's service process writes and uploads in the background."""

    def close(self, state: str = "finished") -> None:
        """Finish the W&B run: exit code 0 when ``finished``, 1 when stopped or failed."""
        self._safely("the end of the run", lambda: self.run.finish(
            exit_code=0 if state == "finished" else 1))
