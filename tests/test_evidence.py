"""The evidence experiment's summary: mean ± std per arm over seeds and HIRL − base per metric."""

from __future__ import annotations

import pytest

from experiments.evidence.run import summarise


def test_summary_means_stds_and_differences():
    rows = [{"method": "simclr", "seed": s, "hirl": h,
             "metrics": {"knn_acc/class": base + (0.1 if h else 0.0), "nmi/class": 0.5,
                         "train/loss": 1.0, "hierarchy/path_accuracy": 0.3}}
            for s, base in enumerate((0.6, 0.7, 0.8)) for h in (False, True)]
    summary, table = summarise(rows)
    mean, std, n = summary["simclr"]["base"]["knn_acc/class"]
    assert (mean, n) == (pytest.approx(0.7), 3) and std == pytest.approx(0.1)
    assert summary["simclr"]["hirl"]["knn_acc/class"][0] == pytest.approx(0.8)
    lines = table.splitlines()
    # Columns: the table's metrics only (no train/ or hierarchy/ keys), kNN before NMI.
    assert lines[0] == "| method | HIRL | knn_acc/class | nmi/class |"
    assert lines[-1] == "| simclr | Δ | +0.100 | +0.000 |"
