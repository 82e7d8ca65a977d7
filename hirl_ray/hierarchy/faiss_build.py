"""Which faiss build runs: exactly one faiss distribution per environment, named at start-up.

``faiss-cpu`` and ``faiss-gpu`` both install the top-level module ``faiss``. With both in one
environment (for example an extra that adds ``faiss-gpu`` on top of a pinned ``faiss-cpu``), pip
writes one over the other file by file, so which build loads — or whether a broken mix of the two
loads — depends on install order. hirl_ray therefore pins faiss only through its mutually exclusive
extras (``hirl_ray[cpu]`` / ``hirl_ray[gpu]``), refuses an environment that holds more than one
faiss distribution, and says which build and how many GPUs it found.
"""

from __future__ import annotations

import importlib.metadata

from hirl_ray.config import ConfigError

#: Distributions on PyPI that provide the ``faiss`` module.
FAISS_DISTRIBUTIONS = (
    "faiss-cpu",
    "faiss-gpu",
    "faiss-gpu-cu11",
    "faiss-gpu-cu12",
    "faiss-gpu-cu12-cuvs",
    "faiss-cuda",
)


def installed_faiss_distributions() -> list[str]:
    """The faiss distributions pip installed in this environment (any order)."""
    found = []
    for name in FAISS_DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def check_faiss_install(found: list[str] | None = None) -> str:
    """The one faiss distribution of this environment; a one-line error if there are several.

    Args:
        found: Installed distributions (default: looked up with ``importlib.metadata``).

    Returns:
        The distribution's name, or ``"faiss"`` for a build pip did not install (conda, source).

    Raises:
        ConfigError: Two or more faiss distributions, or none and no importable ``faiss``.
    """
    found = installed_faiss_distributions() if found is None else found
    if len(found) > 1:
        raise ConfigError(
            f"{' and '.join(sorted(found))} are both installed and overwrite each other's 'faiss' "
            f"module; keep one: pip uninstall -y {' '.join(sorted(found))} && pip install "
            "'hirl_ray[gpu]' (or '[cpu]'), or run `make install-gpu`"
        )
    if found:
        return found[0]
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise ConfigError(
            "faiss is not installed; pip install 'hirl_ray[cpu]' (or 'hirl_ray[gpu]' for faiss-gpu)"
        ) from None
    return "faiss"


def describe_faiss() -> str:
    """One line for logs: version, distribution, GPUs: ``faiss 1.15.1 (faiss-cpu, 0 GPUs)``."""
    import faiss

    dist = check_faiss_install()
    gpus = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    return f"faiss {getattr(faiss, '__version__', '?')} ({dist}, {gpus} GPU{'s' * (gpus != 1)})"
