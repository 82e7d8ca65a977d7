"""``hirl-ray report``'s parameter importance: what Optuna cannot compute falls back quietly to
|Spearman rho|; any other failure falls back too, but says what went wrong."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from hirl_ray.sweep import report
from hirl_ray.sweep.space import parse_tune_spec

SPEC = parse_tune_spec({"metric": "knn_acc/superclass"})
TABLE = pd.DataFrame({"depth": [1, 2, 3, 2], "level0_clusters": [8, 16, 32, 24],
                      "knn_acc/superclass": [0.1, 0.2, 0.3, 0.25]})
COLUMNS = ["depth", "level0_clusters"]


def test_a_sweep_without_a_study_uses_spearman_without_a_warning(tmp_path, caplog):
    # A grid sweep has no Optuna study: load_study raises KeyError, which is expected.
    with caplog.at_level(logging.DEBUG, logger="hirl_ray"):
        values, how = report._importance(tmp_path, SPEC, TABLE, COLUMNS)
    assert how == "|Spearman rho|" and values["level0_clusters"] == pytest.approx(1.0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("no Optuna importance" in r.getMessage() for r in caplog.records)


def test_an_unexpected_failure_is_logged_with_its_error(tmp_path, caplog, monkeypatch):
    import optuna

    def broken(**kwargs):
        raise PermissionError("optuna.db: permission denied")

    monkeypatch.setattr(optuna, "load_study", broken)
    with caplog.at_level(logging.WARNING, logger="hirl_ray"):
        values, how = report._importance(tmp_path, SPEC, TABLE, COLUMNS)
    assert how == "|Spearman rho|" and set(values) == set(COLUMNS)
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "PermissionError: optuna.db: permission denied" in record.getMessage()

