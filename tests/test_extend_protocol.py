"""A new evaluation protocol is one file: here a toy one, defined in this test module only.

It brings its own settings dataclass, is registered without touching library code, is selected
with ``eval.protocols`` and configured with ``eval.params.toy_spread`` (checked by the same
strict loader), and its metric comes out of the function the final evaluation of a fit calls
(:func:`hirl_ray.eval.checkpoint.evaluate_checkpoint`) on a checkpoint of a synthetic run.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.utils.data import DataLoader

from hirl_ray.config import PROTOCOLS, ConfigError, check_fraction, load_config
from hirl_ray.data import ViewDataset, build_dataset, eval_transform
from hirl_ray.eval import EvalInputs, EvalProtocol, metric_prefixes, register_protocol
from hirl_ray.eval.checkpoint import evaluate_checkpoint, load_backbone
from hirl_ray.methods.hirl import HirlModel
from hirl_ray.train.checkpoint import CheckpointMeta, save_checkpoint


@dataclass(frozen=True)
class SpreadConfig:
    """``eval.params.toy_spread``: which quantile of the pairwise distances to report."""

    quantile: float = 0.5

    def check(self, where: str) -> None:
        check_fraction(f"{where}.quantile", self.quantile, upper_open=False)


class FeatureSpread(EvalProtocol):
    """Label-free: a quantile of the pairwise cosine distances between test features."""

    name = "toy_spread"
    Config = SpreadConfig
    metric_prefixes = ("toy_spread",)

    def run(self, inputs: EvalInputs) -> dict[str, float]:
        feats, seen = inputs.features("test")
        return {"toy_spread/test": spread(feats[torch.from_numpy(seen)], self.config.quantile)}


def spread(features: torch.Tensor, quantile: float) -> float:
    x = torch.nn.functional.normalize(features, dim=1)
    return float(torch.quantile(1.0 - x @ x.T, quantile))


@pytest.fixture
def toy_protocol():
    register_protocol(FeatureSpread)
    yield FeatureSpread
    PROTOCOLS.unregister(FeatureSpread.name)
    assert FeatureSpread.name not in PROTOCOLS


SMALL = {"data.train_per_class": 4, "data.test_per_class": 2, "model.width": 16,
         "hirl.num_clusters": [8, 4]}


def test_unregistered_protocol_is_a_config_error():
    with pytest.raises(ConfigError, match="eval.protocols must be one of .*got 'toy_spread'"):
        load_config(None, {"eval.protocols": ["knn", "toy_spread"]})


def test_toy_protocol_settings_go_through_the_strict_loader(toy_protocol):
    cfg = load_config(None, {"eval.protocols": ["knn", "toy_spread"],
                             "eval.params.toy_spread.quantile": 0.9})
    assert cfg.eval.params["toy_spread"] == SpreadConfig(quantile=0.9)
    assert load_config(None, {"eval.protocols": ["toy_spread"]}).eval.params == {
        "toy_spread": SpreadConfig()}
    assert load_config(cfg.to_dict()) == cfg  # a saved config reloads equal
    assert "toy_spread" in metric_prefixes()
    with pytest.raises(ConfigError, match="unknown key eval.params.toy_spread.bogus; "
                                          "valid keys: quantile"):
        load_config(None, {"eval.protocols": ["toy_spread"], "eval.params.toy_spread.bogus": 1})
    with pytest.raises(ConfigError, match=r"eval.params.toy_spread.quantile must be in \[0, 1\]"):
        load_config(None, {"eval.protocols": ["toy_spread"],
                           "eval.params.toy_spread.quantile": 2.0})


def test_final_evaluation_reports_the_toy_metric(toy_protocol, tmp_path):
    torch.manual_seed(0)
    cfg = load_config(None, {**SMALL, "eval.protocols": ["knn", "toy_spread"],
                             "eval.params.toy_spread.quantile": 0.9})
    model = HirlModel.from_config(cfg)
    checkpoint = tmp_path / "epoch_0001"
    save_checkpoint(checkpoint, model_state=model.state_dict(), optimizer_state={},
                    scaler_state=None, meta=CheckpointMeta(epoch=1, step=1, hierarchy_version=0,
                                                           config=cfg.to_dict(), metrics={}))

    metrics = evaluate_checkpoint(checkpoint)

    levels = build_dataset(cfg.data, "test").level_names
    assert set(metrics) == {"toy_spread/test", *(f"knn_acc/{name}" for name in levels)}
    backbone, _ = load_backbone(checkpoint)
    test = DataLoader(ViewDataset(build_dataset(cfg.data, "test"), eval_transform(32)),
                      batch_size=64)
    with torch.no_grad():
        feats = torch.cat([backbone(images) for images, _ in test])
    assert metrics["toy_spread/test"] == pytest.approx(spread(feats, 0.9), abs=1e-5)
