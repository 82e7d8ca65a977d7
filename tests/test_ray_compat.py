"""Ray's private API is reached only through hirl_ray.train.ray_compat, and a Ray that moved a
symbol fails there with one clear line."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest

from hirl_ray.train import ray_compat
from hirl_ray.train.ray_compat import SUPPORTED_RAY, RayCompatError

ROOT = Path(__file__).resolve().parents[1]
# H1 rewrites ray_worker.py; the lead switches its _quiet_ray_train_reports to
# ray_compat.quiet_train_report_logger when merging, then this exemption goes.
PENDING: set[str] = set()


def test_supported_version_is_the_pin_in_pyproject():
    pin = re.search(r'"ray\[[^\]]*\]==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and pin.group(1) == SUPPORTED_RAY


def test_accessors_work_on_the_supported_ray():
    import ray

    if ray.__version__ != SUPPORTED_RAY:
        pytest.skip(f"ray {ray.__version__} installed, not {SUPPORTED_RAY}")
    base = ray_compat.worker_group_callback_base()
    from hirl_ray.sweep.trial import RecordPlacementGroup

    assert issubclass(RecordPlacementGroup, base)
    assert hasattr(base, "after_worker_group_start")
    ray_compat.quiet_train_report_logger()
    from ray.train.v2._internal.execution import context

    assert logging.getLogger(context.__file__).level == logging.WARNING


def test_a_moved_symbol_fails_in_one_place_with_a_clear_message(monkeypatch):
    # None in sys.modules makes "import x" raise ImportError, as after a Ray upgrade moved it.
    monkeypatch.setitem(sys.modules, "ray.train.v2._internal.execution.callback", None)
    with pytest.raises(RayCompatError) as err:
        ray_compat.worker_group_callback_base()
    text = str(err.value)
    assert "\n" not in text
    assert "moved ray.train.v2._internal.execution.callback.WorkerGroupCallback" in text
    assert f"hirl_ray supports ray=={SUPPORTED_RAY}" in text
    with pytest.raises(RayCompatError, match="moved ResultGrid._experiment_analysis"):
        ray_compat.experiment_analysis(object())
    with pytest.raises(RayCompatError, match="placement_group_handle"):
        ray_compat.worker_group_placement_group(object())


def test_the_cosmetic_logger_degrades_gracefully(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.train.v2._internal.execution.context", None)
    ray_compat.quiet_train_report_logger()  # nothing to silence, nothing raised


def test_no_other_module_touches_ray_private_api():
    private = re.compile(r"ray\.[\w.]*\._internal|\._experiment_analysis|"
                         r"get_worker_group_state\(")
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "hirl_ray").rglob("*.py"))
                 if p.name != "ray_compat.py" and private.search(p.read_text())]
    assert set(offenders) <= PENDING, offenders
