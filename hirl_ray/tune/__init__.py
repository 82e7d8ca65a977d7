"""Hyperparameter search over the hierarchy: Optuna + ASHA on Ray Tune, reports, dashboards.

``space`` (the strict ``tune:`` section), ``sampling`` (define-by-run space, grid, overrides),
``label_free`` (the label-free metric) import neither Ray nor Optuna; ``trial``, ``search``
(Ray Tune wiring), ``report`` and ``dashboard`` do.

``hirl_ray.tune`` is also the public function :func:`hirl_ray.api.tune`. Importing any
submodule makes Python rebind the package attribute ``hirl_ray.tune`` to this module, so the
module itself is made callable and forwards to the function: ``hirl_ray.tune(path)`` works
either way.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from hirl_ray.api import tune

        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
