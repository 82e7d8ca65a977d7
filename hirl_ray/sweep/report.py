"""``hirl-ray report <sweep>``: one self-contained HTML page (PNGs inlined) plus the PNGs.

Sections: summary (best configuration, compute used vs. a full-budget sweep, label-free vs kNN
agreement), optimisation history, parallel coordinates over depth and cluster sizes, parameter
importance (Optuna fANOVA on the study; |Spearman| when the study is too small for it), the
Pareto front when several metrics are optimised, the best trial's learning curves and its
prototype tree, and the results table.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from hirl_ray.logs import get_logger, redact_text
from hirl_ray.runs import LAYOUT
from hirl_ray.sweep import plots
from hirl_ray.sweep.space import LABEL_FREE_METRICS, TuneConfig
from hirl_ray.sweep.sweep import load_sweep
from hirl_ray.sweep.tree import prototype_tree

log = get_logger(__name__)

#: What Optuna raises when a study cannot give importances: no such study (a grid sweep has
#: none: KeyError), too few or differently-shaped trials (ValueError), zero variance
#: (RuntimeError). The table's |Spearman rho| stands in, silently.
NO_IMPORTANCE = (KeyError, ValueError, RuntimeError)


def _importance(sweep_dir: Path, spec: TuneConfig, table: pd.DataFrame,
                columns: list[str]) -> tuple[dict[str, float], str]:
    """Optuna's fANOVA importance over the study, else |Spearman| on the table."""
    try:
        import optuna

        from hirl_ray.sweep.search import optuna_storage, study_name

        study = optuna.load_study(study_name=study_name(spec, sweep_dir),
                                  storage=optuna_storage(spec, sweep_dir))
        target = (lambda t: t.values[0]) if spec.multi_objective else None
        values = optuna.importance.get_param_importances(study, target=target)
        if values:
            return {k: float(v) for k, v in values.items()}, "Optuna fANOVA"
    except NO_IMPORTANCE as e:
        log.debug("no Optuna importance for %s: %s", sweep_dir, e)
    except Exception as e:  # noqa: BLE001 - e.g. an unreadable study: say so, keep the report
        log.warning("Optuna parameter importance failed (%s: %s); the report shows |Spearman "
                    "rho| instead", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return plots.spearman_importance(table, columns, spec.primary_metric), "|Spearman rho|"


def _best_results(sweep_dir: Path, trial_id: str) -> list[dict[str, Any]]:
    for f in LAYOUT.tune_dir(sweep_dir).glob(f"*{trial_id}*/result.json"):
        return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return []


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return f"<p><em>{html.escape(alt)}: not available.</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">' \
           f"<figcaption>{html.escape(alt)}</figcaption></figure>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
img{max-width:100%;border:1px solid #ddd}figure{margin:1.2em 0}figcaption{color:#666;font-size:.9em}
table{border-collapse:collapse;font-size:.8em}td,th{border:1px solid #ccc;padding:2px 6px}
.kv td:first-child{font-weight:600}"""


def write_report(sweep_dir: str | Path) -> Path:
    """Write ``<sweep>/report/index.html`` and its PNGs; returns the HTML path."""
    from hirl_ray.sweep.search import pareto_front, pick_best, results_table

    sweep_dir = Path(sweep_dir).resolve()
    cfg, spec, _ = load_sweep(sweep_dir)
    table = results_table(sweep_dir, spec, cfg.train.epochs)
    if table.empty:
        raise FileNotFoundError(f"no finished trial in {LAYOUT.tune_dir(sweep_dir)}; run "
                                "hirl-ray tune first")
    out = LAYOUT.report_dir(sweep_dir)
    out.mkdir(exist_ok=True)
    best = pick_best(table, spec)
    shape_cols = ["depth"] + sorted(c for c in table.columns if c.startswith("K_"))
    param_cols = list(spec.space.params)
    metric, mode = spec.primary_metric, spec.primary_mode
    figs: list[tuple[Path | None, str]] = [
        (plots.history(table, metric, mode, out / "history.png"),
         "Optimisation history"),
        (plots.parallel_coordinates(table, shape_cols + param_cols, metric,
                                    out / "parallel_coordinates.png"),
         "Parallel coordinates over depth, cluster sizes and searched parameters")]
    imp, how = _importance(sweep_dir, spec, table, ["depth", "level0_clusters"] + param_cols)
    figs.append((plots.importance(imp, how, out / "importance.png") if imp else None,
                 "Parameter importance"))
    if spec.multi_objective:
        ok = table.dropna(subset=list(spec.metrics))
        figs.append((plots.pareto(ok, pareto_front(ok, spec), spec.metrics, out / "pareto.png"),
                     "Pareto front"))
    curves = _best_results(sweep_dir, best["trial_id"])
    figs.append((plots.learning_curves(curves, spec.metrics, out / "learning_curves.png")
                 if curves else None, "Best trial: learning curves"))
    figs.append((prototype_tree(LAYOUT.trial_dir(sweep_dir, best["trial_id"]), best["checkpoint"],
                                out / "prototype_tree.png"), "Best trial: prototype tree"))

    worst = table[metric].min() if mode == "max" else table[metric].max()
    full_budget = len(table) * cfg.train.epochs
    used = int(table["epochs_trained"].sum())
    facts = {
        "metric": ", ".join(f"{m} ({d})" for m, d in zip(spec.metrics, spec.modes, strict=True)),
        "best trial": f"{best['trial_id']}: depth {best['depth']}, clusters "
                      f"{best['num_clusters']}, {metric} = {best[metric]:.4f}",
        "worst trial": f"{metric} = {worst:.4f}",
        "best checkpoint": str(best["checkpoint"]),
        "trials": f"{len(table)} ({int(table['stopped_early'].sum())} stopped early by ASHA)",
        "compute": f"{used} trial-epochs of {full_budget} for full-budget trials "
                   f"({100 * used / max(full_budget, 1):.0f}%)",
        "searcher / scheduler": f"{spec.searcher.name} / {spec.scheduler.name}",
    }
    full = table[~table["stopped_early"]]
    if len(full) and metric in full:
        facts["full-budget trials"] = f"{metric} from {full[metric].min():.4f} to " \
                                      f"{full[metric].max():.4f} over {len(full)} trials"
    # Do the label-free criteria rank trials like kNN does? (the optimised kNN level if any)
    knn = [m for m in spec.metrics if m.startswith("knn_acc/")] or \
        [c for c in table.columns if c.startswith("knn_acc/")][:1]
    if knn:
        for criterion in (c for c in LABEL_FREE_METRICS if c in table.columns):
            rho = spearmanr(table[criterion], table[knn[0]], nan_policy="omit").statistic
            facts[f"{criterion} vs kNN"] = (f"Spearman rho = {rho:.2f} against {knn[0]} over "
                                            f"{len(table)} trials" if np.isfinite(rho) else "n/a")
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(redact_text(str(v)))}</td></tr>"
                   for k, v in facts.items())
    shown = [c for c in table.columns if c not in ("checkpoint", "started", "finished")]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>HIRL sweep "
            f"{html.escape(sweep_dir.name)}</title><style>{_CSS}</style></head><body>"
            f"<h1>HIRL hierarchy sweep: {html.escape(sweep_dir.name)}</h1>"
            f"<table class='kv'>{rows}</table>"
            + "".join(_img(p, alt) for p, alt in figs)
            + "<h2>All trials</h2><div style='overflow-x:auto'>"
            + table[shown].to_html(index=False, float_format=lambda v: f"{v:.4g}") + "</div>"
            + "</body></html>")
    index = out / "index.html"
    index.write_text(page)
    return index


def screenshot(html_file: str | Path, png: str | Path, width: int = 1200,
               height: int = 4000) -> Path:
    """Render the page in headless Chromium (Debian ``chromium``) and save a PNG."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")
    if exe is None:
        raise FileNotFoundError("no chromium on PATH; apt-get install -y chromium")
    png = Path(png).resolve()
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={png}",
                    f"file://{Path(html_file).resolve()}"], check=True, capture_output=True,
                   timeout=120)
    return png
