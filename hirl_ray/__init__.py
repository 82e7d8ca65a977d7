"""hirl_ray: HIRL (Hierarchical Image Representation Learning) pretraining on Ray."""

from hirl_ray.api import FitResult, fit, load_backbone
from hirl_ray.config import ConfigError, ExperimentConfig, load_config

__all__ = ["ConfigError", "ExperimentConfig", "FitResult", "fit", "load_backbone", "load_config"]
__version__ = "0.1.0"
