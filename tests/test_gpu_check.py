"""`make gpu-check` stays runnable: without a GPU it says so and exits 0; its checks pass on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from experiments import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: make gpu-check runs")
def test_without_a_gpu_it_says_so_and_exits_0(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path / "r.json")]) == 0
    assert "no CUDA GPU visible" in capsys.readouterr().out
    assert not (tmp_path / "r.json").exists()


def test_its_checks_run_and_pass_on_the_cpu(tmp_path):
    out = tmp_path / "r.json"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out),
                         "--only", "amp_steps", "host_syncs", "path_loss", "faiss_gpu",
                         "augment_gpu"])
    checks = json.loads(out.read_text())["checks"]
    assert rc == 0, {k: v.get("error") or v for k, v in checks.items()}
    from hirl_ray.methods import METHODS

    builtin = {n for n, c in METHODS.items() if c.__module__.startswith("hirl_ray.")}
    assert set(checks["amp_steps"]["methods"]) == builtin
    # Under bf16 autocast the path loss must still be computed in float32.
    assert checks["path_loss"]["loss_dtype"] == "torch.float32"
    assert checks["path_loss"]["rel_loss_err"] < 1e-4
    assert checks["faiss_gpu"]["ok"] is None and "skipped" in checks["faiss_gpu"]
    assert checks["host_syncs"]["ok"] is None and "CUDA-only" in checks["host_syncs"]["skipped"]
    # data.augment_on=gpu: the device-side views ran (here on the CPU) and trained.
    aug = checks["augment_gpu"]
    assert aug["views_img_s_device"] > 0 and aug["train_steps"] == 2
