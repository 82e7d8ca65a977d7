"""Secrets never reach a dumped config, a log line or a report (issue 14).

A planted password (inside ``tune.storage.url``), an AWS key id and secret (inside an
``s3://KEY:SECRET@bucket`` URI in the metrics) and the value of ``AWS_SECRET_ACCESS_KEY``
passed on through a config key go through every dump a run makes without Ray (config.yaml, a
checkpoint's meta.json, sweep.json, metrics, log lines); then every file written is grepped.
``tests/test_interrupt.py`` greps the files and console of a real ``hirl-ray fit`` too.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from hirl_ray.config import ConfigError, from_dict, load_config
from hirl_ray.logs import REDACTED, console, get_logger, redact, redact_text
from hirl_ray.runs import LAYOUT, prepare_run
from hirl_ray.train.checkpoint import (
    CheckpointMeta,
    newest_checkpoint_config,
    read_meta,
    save_checkpoint,
)

PASSWORD = "pl4nted-db-pw"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"
URL_SECRET = "pl4nted-url-secret"
ENV_SECRET = "pl4nted-env-secret-8f3a9c"
SECRETS = (PASSWORD, KEY_ID, URL_SECRET, ENV_SECRET)


def planted_overrides(tmp_path: Path) -> dict:
    """Config keys carrying the planted secrets (set ``AWS_SECRET_ACCESS_KEY=ENV_SECRET``)."""
    return {"storage.path": str(tmp_path), "storage.name": "run",
            "tune.metric": "knn_acc/superclass",
            "tune.storage.url": f"postgresql://hirl:{PASSWORD}@db.example.com/optuna",
            "tune.storage.study_name": f"study-{ENV_SECRET}"}


def files_with_secrets(root: Path, extra: str = "") -> dict[str, list[str]]:
    """``{file: [secrets found]}`` over every file under ``root`` (binary too) and ``extra``."""
    found = {}
    for path in [p for p in root.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        hits = [s for s in SECRETS if s.encode() in data]
        if hits:
            found[str(path)] = hits
    hits = [s for s in SECRETS if s in extra]
    if hits:
        found["<console>"] = hits
    return found


def test_redact_finds_url_passwords_secret_keys_key_ids_and_secret_env_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.setenv("SHORT_TOKEN", "1")  # too short to hunt for
    raw = {"tune": {"storage": {"url": f"postgresql://u:{PASSWORD}@h/db"}},
           "aws_secret_access_key": "abc", "hf_token": "hf_x", "token_dim": 64,
           "num_tokens": "keep me", "root": f"s3://{KEY_ID}:{URL_SECRET}@b/x",
           "note": f"carried {ENV_SECRET} along", "n": 1}
    out = redact(raw)
    assert out["tune"]["storage"]["url"] == f"postgresql://u:{REDACTED}@h/db"
    assert out["aws_secret_access_key"] == out["hf_token"] == REDACTED
    assert out["token_dim"] == 64 and out["num_tokens"] == "keep me" and out["n"] == 1
    assert out["root"] == f"s3://{REDACTED}:{REDACTED}@b/x"
    assert out["note"] == f"carried {REDACTED} along"
    assert redact_text("password=hunter22 token: abc123 x=1") == \
        f"password={REDACTED} token: {REDACTED} x=1"
    assert raw["hf_token"] == "hf_x"  # a copy: the caller's config is untouched
    # The shell's working folder is not a secret, though its name ends in "pwd".
    monkeypatch.setenv("PWD", "/home/me/experiments")
    assert redact_text("wrote /home/me/experiments/run") == "wrote /home/me/experiments/run"


def test_log_lines_are_redacted_by_the_logger_and_by_the_console_handler(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    stream = io.StringIO()
    console(stream=stream)
    try:
        get_logger("hirl_ray.test_secrets").info("connecting to %s with %s",
                                                 f"postgresql://u:{PASSWORD}@h/db", ENV_SECRET)
        # A module that uses logging.getLogger directly: the console handler's filter.
        logging.getLogger("hirl_ray.train.ray_hierarchy").warning("key %s", KEY_ID)
    finally:
        console(stream=None)
    text = stream.getvalue()
    assert f"postgresql://u:{REDACTED}@h/db" in text and text.count(REDACTED) == 3
    assert not any(s in text for s in SECRETS), text


def test_a_planted_secret_appears_in_no_file_and_no_log_line_of_a_run(tmp_path, monkeypatch):
    from hirl_ray.sweep.sampling import search_params
    from hirl_ray.sweep.space import tune_spec
    from hirl_ray.sweep.sweep import SweepPlan, plan_sweep, write_sweep_file

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    cfg = load_config(None, planted_overrides(tmp_path))
    assert PASSWORD in cfg.to_dict()["tune"]["storage"]["url"]  # planted for real
    stream = io.StringIO()
    console(stream=stream)
    try:
        log = get_logger("hirl_ray.test_secrets")
        log.info("experiment: %s", cfg.to_dict())
        run_dir = prepare_run(cfg, newest_checkpoint_config)  # config.yaml
        checkpoint = save_checkpoint(  # meta.json carries the config and metrics
            Path(LAYOUT.train_dir(run_dir)) / LAYOUT.checkpoint_name(1),
            model_state={"w": torch.ones(1)}, optimizer_state={}, scaler_state=None,
            meta=CheckpointMeta(epoch=1, step=1, hierarchy_version=0, config=cfg.to_dict(),
                                metrics={"loss": 1.0,
                                         "source": f"s3://{KEY_ID}:{URL_SECRET}@bucket/x"}))
        sweep_dir = Path(run_dir)  # the experiment's folder, as hirl-ray tune would use
        spec = tune_spec(cfg)
        write_sweep_file(SweepPlan(cfg, spec, search_params(spec, cfg), sweep_dir, 240,
                                   ("class",), False))
        # A rerun of the same experiment resumes; the redacted copies still load.
        assert prepare_run(cfg, newest_checkpoint_config) == run_dir
        restored = from_dict(read_meta(checkpoint).config)
        assert restored.hirl == cfg.hirl and REDACTED in restored.section("tune").storage.url
        assert from_dict(yaml.safe_load(Path(LAYOUT.config_file(run_dir)).read_text())).model \
            == cfg.model
        # Resuming the sweep from its folder needs the password again (it was not saved).
        (LAYOUT.tune_dir(sweep_dir)).mkdir()
        with pytest.raises(ConfigError, match=r"tune.storage.url was saved redacted"):
            plan_sweep(sweep_dir, resume=True)
        log.warning("failed to open %s", cfg.section("tune").storage.url)
    finally:
        console(stream=None)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"config.yaml", "meta.json", "state.pt", "sweep.json"}
    assert files_with_secrets(tmp_path, stream.getvalue()) == {}
    saved = json.loads((sweep_dir / "sweep.json").read_text())["config"]
    assert saved["tune"]["storage"]["url"] == f"postgresql://hirl:{REDACTED}@db.example.com/optuna"
