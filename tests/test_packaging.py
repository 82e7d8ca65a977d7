"""One faiss build per environment: the extras, the install rules and the start-up check agree."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from hirl_ray.config import ConfigError
from hirl_ray.hierarchy import faiss_build

ROOT = Path(__file__).resolve().parents[1]


def _faiss_requirements(reqs: list[str]) -> list[str]:
    return [r for r in reqs if re.match(r"faiss", r)]


def test_faiss_comes_only_from_mutually_exclusive_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _faiss_requirements(project["dependencies"]) == []
    extras = project["optional-dependencies"]
    assert _faiss_requirements(extras["cpu"]) == ["faiss-cpu==1.15.1"]
    assert _faiss_requirements(extras["gpu"]) == ["faiss-gpu==1.15.1"]
    for name, reqs in extras.items():
        if name not in ("cpu", "gpu"):
            assert _faiss_requirements(reqs) == [], f"extra {name} pulls in faiss"


def test_make_installs_one_flavour_and_removes_the_other():
    for flavour, other in (("cpu", "faiss-gpu"), ("gpu", "faiss-cpu")):
        out = subprocess.run(
            ["make", "-n", "-B", ".venv/.installed-test", f"FAISS={flavour}"], cwd=ROOT,
            capture_output=True, text=True, check=True).stdout
        lines = out.splitlines()
        uninstall = next(i for i, line in enumerate(lines) if f"uninstall -y -q {other}" in line)
        wanted = f"install -e '.[{flavour},test]'"
        install = next(i for i, line in enumerate(lines) if wanted in line)
        assert uninstall < install, out


def test_this_environment_has_exactly_one_faiss():
    assert len(faiss_build.installed_faiss_distributions()) == 1
    assert faiss_build.check_faiss_install() in faiss_build.FAISS_DISTRIBUTIONS
    assert re.fullmatch(r"faiss \S+ \(faiss-\S+, \d+ GPUs?\)", faiss_build.describe_faiss())


def test_two_faiss_builds_are_refused_with_the_fix():
    with pytest.raises(ConfigError) as e:
        faiss_build.check_faiss_install(["faiss-gpu", "faiss-cpu"])
    msg = str(e.value)
    assert "\n" not in msg
    assert "faiss-cpu and faiss-gpu" in msg and "pip uninstall -y faiss-cpu faiss-gpu" in msg


def test_a_faiss_not_installed_by_pip_is_accepted():
    # e.g. conda's faiss: no pip metadata, but the module imports.
    assert faiss_build.check_faiss_install([]) == "faiss"
