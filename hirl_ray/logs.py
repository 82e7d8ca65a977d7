"""Library logging: every module logs to a ``hirl_ray.*`` logger, never ``print``.

The command line, :func:`hirl_ray.fit`/:func:`hirl_ray.tune` and each Ray worker call
:func:`console` once; it gives the ``hirl_ray`` logger one handler that writes
``[hirl_ray] message`` lines (warnings: ``[hirl_ray] warning: message``) to standard output.
Ray Train V2 patches ``print`` in workers to tee into its own logger, which shows each line
twice; a logging handler writing to the stream shows it once. An application that configures
logging itself can skip :func:`console` and route the ``hirl_ray`` logger as it likes.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

ROOT = "hirl_ray"


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"[hirl_ray] {level}{record.getMessage()}"


class _ConsoleHandler(logging.StreamHandler):
    """Writes to ``sys.stdout`` as it is at emit time (pytest swaps it), or a fixed stream."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__()
        self._fixed = stream

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = self._fixed or sys.stdout
        super().emit(record)


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (``__name__``), under the ``hirl_ray`` root."""
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def console(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Show ``hirl_ray`` log lines on the console (idempotent; ``stream``: default stdout)."""
    root = logging.getLogger(ROOT)
    root.setLevel(level)
    for handler in root.handlers:
        if isinstance(handler, _ConsoleHandler):
            handler._fixed = stream
            return
    handler = _ConsoleHandler(stream)
    handler.setFormatter(_Format())
    root.addHandler(handler)
    root.propagate = False
