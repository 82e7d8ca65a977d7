"""hirl_ray: HIRL (Hierarchical Image Representation Learning) pretraining on Ray."""

import logging as _logging

# faiss announces at INFO which SIMD build it loaded, in every Ray worker; keep it quiet.
_logging.getLogger("faiss.loader").setLevel(_logging.WARNING)

# The built-in datasets, backbones and methods register themselves in hirl_ray.config's
# registries when imported; do it here so any load_config() sees them.
import hirl_ray.data  # noqa: E402, F401
import hirl_ray.eval  # noqa: E402, F401
import hirl_ray.methods  # noqa: E402, F401
import hirl_ray.models  # noqa: E402, F401

# The tune: section's dataclasses (no Ray, no Optuna) register with hirl_ray.config.
import hirl_ray.sweep.space  # noqa: E402, F401
from hirl_ray.api import (  # noqa: E402
    FitResult,
    Interrupted,
    TuneResult,
    evaluate,
    fit,
    load_backbone,
    tune,
)
from hirl_ray.config import ConfigError, ExperimentConfig, load_config  # noqa: E402

__all__ = ["ConfigError", "ExperimentConfig", "FitResult", "Interrupted", "TuneResult",
           "evaluate", "fit", "load_backbone", "load_config", "tune"]
__version__ = "0.1.0"
