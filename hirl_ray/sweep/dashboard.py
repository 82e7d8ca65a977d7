"""``hirl-ray dashboard <sweep>``: optuna-dashboard on 127.0.0.1 for the sweep's study.

The study lives in the sweep's own storage (SQLite ``<sweep>/optuna.db`` by default), which is
why OptunaSearch is given explicit storage (ray #48500): Tune's default in-memory study would
leave the dashboard empty. Loopback only: the dashboard has no authentication.
"""

from __future__ import annotations

from pathlib import Path

from hirl_ray.config import ConfigError
from hirl_ray.logs import get_logger
from hirl_ray.sweep.sweep import load_sweep

log = get_logger(__name__)

HOST = "127.0.0.1"


def serve_dashboard(sweep_dir: str | Path, port: int = 8080) -> None:
    """Serve the dashboard until Ctrl-C (logs the URL to open first)."""
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise ConfigError("optuna-dashboard is not installed; pip install optuna-dashboard "
                          "(it is in the test extra: pip install -e .[test])") from None
    from hirl_ray.sweep.search import optuna_storage, study_name

    sweep_dir = Path(sweep_dir).resolve()
    _, spec, _ = load_sweep(sweep_dir)
    if spec.searcher.name == "grid":
        raise ConfigError(f"{sweep_dir} is a grid sweep: it has no Optuna study; use "
                          "hirl-ray report instead")
    name = study_name(spec, sweep_dir)
    log.info("optuna-dashboard for study %r: open http://%s:%d/ (Ctrl-C stops it)", name, HOST,
             port)
    run_server(optuna_storage(spec, sweep_dir), host=HOST, port=port)
