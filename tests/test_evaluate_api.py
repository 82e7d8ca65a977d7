"""``hirl_ray.evaluate`` / ``hirl-ray eval`` on a tiny run folder made without Ray.

The run folder holds one checkpoint of an untrained HIRL model (synthetic data, 16-wide CNN)
and a prototype hierarchy fitted on its cluster features, in the layout a fit writes, so the
same code path as ``hirl-ray eval <run>`` after ``make train`` is exercised in a second.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import hirl_ray
from hirl_ray import storage
from hirl_ray.cli import EVAL_METRICS, main
from hirl_ray.config import ConfigError, load_config
from hirl_ray.data import ViewDataset, build_dataset, eval_transform
from hirl_ray.eval import EvalInputs, knn_accuracy
from hirl_ray.eval import protocol as protocol_module
from hirl_ray.eval import report as report_module
from hirl_ray.eval.checkpoint import evaluate_checkpoint, load_backbone, run_checkpoint_evaluation
from hirl_ray.eval.features import extract_features
from hirl_ray.eval.plots import embedding_plot, level_bars
from hirl_ray.hierarchy import fit_hierarchy, save_hierarchy
from hirl_ray.methods.hirl import HirlModel
from hirl_ray.runs import LAYOUT
from hirl_ray.train.checkpoint import CheckpointMeta, save_checkpoint

SMALL = {"data.train_per_class": 4, "data.test_per_class": 3, "model.width": 16,
         "hirl.num_clusters": [8, 4], "eval.protocols": ["knn", "clustering", "consistency"]}


def make_run(run_dir: Path) -> Path:
    """A run folder with ``train/epoch_0001`` and ``hierarchy/hierarchy_v000001.pt``."""
    torch.manual_seed(0)
    cfg = load_config(None, SMALL)
    model = HirlModel.from_config(cfg).eval()
    checkpoint = Path(LAYOUT.train_dir(run_dir)) / LAYOUT.checkpoint_name(1)
    save_checkpoint(checkpoint, model_state=model.state_dict(), optimizer_state={},
                    scaler_state=None, meta=CheckpointMeta(epoch=1, step=1, hierarchy_version=1,
                                                           config=cfg.to_dict(), metrics={}))
    train = build_dataset(cfg.data, "train")
    loader = DataLoader(ViewDataset(train, eval_transform(32)), batch_size=64)
    feats, idx = extract_features(model.cluster_embed, loader)
    h = fit_hierarchy(feats[torch.argsort(idx)], [8, 4], nredo=1, version=1)
    save_hierarchy(h, LAYOUT.hierarchy_dir(run_dir))
    return checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    run_dir = tmp_path_factory.mktemp("evalapi") / "run"
    return run_dir, make_run(run_dir)


def backbone_features(checkpoint: Path, split: str, test_per_class: int = 3) -> torch.Tensor:
    cfg = load_config(None, {**SMALL, "data.test_per_class": test_per_class})
    backbone, _ = load_backbone(checkpoint)
    loader = DataLoader(ViewDataset(build_dataset(cfg.data, split), eval_transform(32)),
                        batch_size=50)
    with torch.no_grad():
        return torch.nn.functional.normalize(torch.cat([backbone(x) for x, _ in loader]), dim=1)


def test_evaluate_is_the_fits_final_evaluation(run):
    run_dir, checkpoint = run
    metrics = hirl_ray.evaluate(run_dir)  # a run folder: its newest checkpoint
    levels = build_dataset(load_config(None, SMALL).data, "test").level_names
    assert {f"{m}/{lvl}" for m in ("knn_acc", "nmi", "ari", "acc") for lvl in levels} < set(metrics)
    assert "hierarchy/path_consistency" in metrics  # the run's hierarchy was found
    fit_metrics = evaluate_checkpoint(checkpoint, LAYOUT.hierarchy_dir(run_dir))
    assert fit_metrics == pytest.approx(metrics, abs=1e-12)


def test_protocols_and_overrides_give_the_direct_knn_figure(run):
    run_dir, checkpoint = run
    metrics = hirl_ray.evaluate(checkpoint, protocols=["knn"], overrides=["knn.k=3"])
    cfg = load_config(None, SMALL).data
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert set(metrics) == {f"knn_acc/{lvl}" for lvl in train.level_names}
    f_tr, f_te = backbone_features(checkpoint, "train"), backbone_features(checkpoint, "test")
    for j, lvl in enumerate(train.level_names):
        expected = knn_accuracy(f_tr, train.labels[:, j], f_te, test.labels[:, j], k=3,
                                temperature=0.07)
        assert metrics[f"knn_acc/{lvl}"] == pytest.approx(expected, abs=1e-6)
    k20 = hirl_ray.evaluate(checkpoint, protocols="knn",
                            overrides={"eval.params.knn.k": 20})
    assert k20 != metrics  # the override reached the protocol


def test_features_are_extracted_once_for_every_protocol(run, monkeypatch):
    calls = []
    real = protocol_module.extract_features

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol_module, "extract_features", counting)
    metrics = hirl_ray.evaluate(run[0], protocols=["knn", "clustering"])
    assert len(calls) == 2  # train and test, once each
    assert any(k.startswith("knn_acc/") for k in metrics)
    assert any(k.startswith("nmi/") for k in metrics)


def test_other_data_and_no_hierarchy(run):
    run_dir, checkpoint = run
    more = run_checkpoint_evaluation(checkpoint, data={"test_per_class": 5},
                                     protocols=["knn", "consistency"],
                                     hierarchy_dir=LAYOUT.hierarchy_dir(run_dir))
    assert not more.same_data and more.config.data.train_per_class == 4  # merged on the run's
    assert len(more.inputs.test_labels) == 5 * 24
    assert more.metrics["consistency"] == {}  # the run's tree indexes other samples
    digits = hirl_ray.evaluate(checkpoint, data={"name": "digits"}, protocols=["knn"])
    assert set(digits) == {"knn_acc/digit"} and 0.1 < digits["knn_acc/digit"] <= 1.0


@pytest.mark.parametrize("kwargs, message", [
    ({"overrides": {"train.epochs": 3}}, "override 'train.epochs': only eval.params"),
    ({"overrides": ["eval.protocols=[knn]"]}, "pass protocols="),
    ({"overrides": {"knn.bogus": 1}}, "unknown key eval.params.knn.bogus"),
    ({"protocols": ["knn"], "overrides": {"clustering.nredo": 2}},
     "eval.params.clustering is set but 'clustering' is not in eval.protocols"),
    ({"protocols": ["nope"]}, "eval.protocols must be one of"),
    ({"data": {"name": "npz"}}, "data.root is required"),
    ({"data": 3}, "data must be a data: mapping"),
])
def test_bad_arguments_are_one_config_error(run, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        hirl_ray.evaluate(run[1], **kwargs)


@dataclasses.dataclass(frozen=True)
class InputsWithImages(EvalInputs):
    """EvalInputs with the optional fields a fine-tuning protocol reads (issue-11 E2)."""

    encoder: Callable[[], nn.Module] | None = None
    feat_dim: int | None = None
    train_images: Any = None
    test_images: Any = None


def test_fine_tuning_inputs_are_filled_when_evalinputs_has_them(run, monkeypatch):
    checkpoint = run[1]
    names = {f.name for f in dataclasses.fields(EvalInputs)}
    plain = run_checkpoint_evaluation(checkpoint, protocols=["knn"]).inputs
    assert {"encoder", "train_images"} & names == {
        n for n in ("encoder", "train_images") if getattr(plain, n, None) is not None}

    monkeypatch.setattr(report_module, "EvalInputs", InputsWithImages)
    inputs = run_checkpoint_evaluation(checkpoint, protocols=["knn"]).inputs
    backbone, _ = load_backbone(checkpoint)
    first, second = inputs.encoder(), inputs.encoder()
    assert first is not second and first.training
    assert all(p.requires_grad for p in first.parameters())
    image, index = inputs.test_images[7]
    assert index == 7 and len(inputs.train_images) == len(inputs.train_labels)
    with torch.no_grad():
        out = first.eval()(image[None])
        assert out.shape == (1, inputs.feat_dim)
        assert torch.allclose(out, backbone(image[None]), atol=1e-6)
        next(first.parameters()).add_(1.0)  # training the copy must not touch the others
        assert torch.allclose(second.eval()(image[None]), backbone(image[None]), atol=1e-6)


def test_progress_bars_when_asked(run, capsys):
    run_checkpoint_evaluation(run[1], protocols=["knn"], progress=True)
    assert "features train" in capsys.readouterr().err
    run_checkpoint_evaluation(run[1], protocols=["knn"], progress=False)
    assert "features" not in capsys.readouterr().err


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
        return img.size


def test_plots_are_written_as_pngs(run, tmp_path):
    metrics = hirl_ray.evaluate(run[0], plots=tmp_path / "plots")
    names = {"embedding_pca.png", "embedding_tsne.png", "clustering.png", "level_metrics.png",
             "prototype_tree.png"}
    assert {p.name for p in (tmp_path / "plots").iterdir()} == names
    for name in names:
        width, height = _png(tmp_path / "plots" / name)
        assert width > 200 and height > 200
    assert "nmi/class" in metrics


def test_plot_functions_on_known_inputs(tmp_path):
    x = np.concatenate([np.zeros((20, 4)), np.ones((20, 4))]) + 0.01 * np.arange(40)[:, None]
    y = np.repeat([[0], [1]], 20, axis=0)
    assert _png(embedding_plot(x, y, ["class"], tmp_path / "e.png", "tsne"))[0] > 200
    assert _png(embedding_plot(x, y[:, :0], [], tmp_path / "u.png"))[0] > 200  # unlabelled
    metrics = {"nmi/fine": 1.0, "ari/fine": 0.5, "nmi/coarse": 0.2, "knn_acc/fine": 0.9}
    assert level_bars(metrics, ["nmi", "ari", "fm"], ["fine", "coarse"], tmp_path / "b.png")
    assert level_bars(metrics, ["fm"], ["fine"], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_cli_prints_every_protocol_and_writes_json(run, tmp_path, capsys):
    run_dir, _ = run
    plots = tmp_path / "plots"
    assert main(["eval", str(run_dir), "--protocols", "knn,consistency", "--plots", str(plots),
                 "knn.k=5"]) == 0
    out = capsys.readouterr().out
    assert "knn:" in out and "consistency:" in out and "hierarchy/path_consistency" in out
    saved = json.loads((run_dir / EVAL_METRICS).read_text())
    assert saved == pytest.approx(hirl_ray.evaluate(run_dir, protocols=["knn", "consistency"],
                                                    overrides={"knn.k": 5}), abs=1e-12)
    assert f"{saved['knn_acc/class']:.4f}" in out
    assert (plots / "embedding_pca.png").is_file()

    out_file = tmp_path / "m.json"
    assert main(["eval", str(run_dir), "data.test_per_class=2", "--protocols", "knn",
                 "--out", str(out_file)]) == 0
    assert "not the run's training data" in capsys.readouterr().out
    assert set(json.loads(out_file.read_text())) == {k for k in saved if k.startswith("knn")}


def test_cli_errors_are_one_line(run, capsys):
    assert main(["eval", str(run[0]), "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hirl-ray: error: evaluate: override 'train.epochs'") and \
        err.count("\n") == 1
    assert main(["eval", str(run[0] / "nothing")]) == 2
    assert "no hirl_ray checkpoint" in capsys.readouterr().err


@pytest.fixture
def bucket(s3_server):
    import boto3

    s3 = boto3.client("s3")
    if "evalapi" not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket="evalapi")
    return "evalapi"


def test_evaluate_a_run_folder_on_s3(run, bucket):
    run_dir, _ = run
    remote = f"s3://{bucket}/runs/run"
    for path in run_dir.rglob("*"):
        if path.is_file() and path.name != EVAL_METRICS:
            storage.upload_file(path, storage.join(remote, path.relative_to(run_dir).as_posix()))
    protocols = ["knn", "consistency"]
    got = hirl_ray.evaluate(remote, protocols=protocols)
    assert "hierarchy/path_consistency" in got
    assert got == pytest.approx(hirl_ray.evaluate(run_dir, protocols=protocols), abs=1e-12)
    assert main(["eval", remote, "--protocols", "knn"]) == 0
    assert "knn_acc/class" in json.loads(storage.read_text(f"{remote}/{EVAL_METRICS}"))
