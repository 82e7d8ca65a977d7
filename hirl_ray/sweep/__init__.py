"""Hyperparameter sweeps over the hierarchy: Optuna + ASHA on Ray Tune, reports, dashboards.

``space`` (the ``tune:`` section's dataclasses) and ``sampling`` (define-by-run space, grid,
overrides) import neither Ray nor Optuna; ``trial``, ``search`` (Ray Tune wiring), ``report``
and ``dashboard`` do. The public entry point is :func:`hirl_ray.tune` (``hirl_ray/api.py``).
"""
