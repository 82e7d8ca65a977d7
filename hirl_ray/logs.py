"""Library logging: every module logs to a ``hirl_ray.*`` logger, never ``print``.

The command line, :func:`hirl_ray.fit`/:func:`hirl_ray.tune` and each Ray worker call
:func:`console` once; it gives the ``hirl_ray`` logger one handler that writes
``[hirl_ray] message`` lines (warnings: ``[hirl_ray] warning: message``) to standard output.
Ray Train V2 patches ``print`` in workers to tee into its own logger, which shows each line
twice; a logging handler writing to the stream shows it once. An application that configures
logging itself can skip :func:`console` and route the ``hirl_ray`` logger as it likes.

Secrets never reach a log line or a dumped file: :func:`redact` is the one function every
config, metrics or report dump goes through, and :class:`RedactFilter` applies it to every
record of a ``hirl_ray`` logger (attached by :func:`get_logger` and by the console handler).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

ROOT = "hirl_ray"

#: What a redacted secret reads as.
REDACTED = "***"
# A key whose name has one of these as a ``_``/``.``/``-``-separated part holds a secret
# (``aws_secret_access_key``, ``password``, ``hf_token``, ``api_key``); ``num_tokens`` does not.
_SECRET_KEY = re.compile(r"(?:^|[_.\-])(secret|secrets|password|passwd|pwd|token|access_key|"
                         r"secret_key|api_key|apikey|private_key|credentials?)(?:$|[_.\-])",
                         re.IGNORECASE)
# ``scheme://user:password@host``: the password part (SQLAlchemy URLs, s3://KEY:SECRET@bucket).
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):([^@\s/]+)@")
# ``password=...`` / ``aws_secret_access_key: ...`` inside free text (errors, query strings).
_KEY_VALUE = re.compile(r"(\b[\w.\-]*(?:secret|password|passwd|token|access_key|api_key)"
                        r"[\w\-]*)(\s*[=:]\s*)(?!\*\*\*)([^\s,;&'\"}\]]+)", re.IGNORECASE)
# AWS access key ids (long-term AKIA…, temporary ASIA…).
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_MIN_ENV_SECRET = 8  # shorter environment values ("1", "true") are too common to hunt for
# Shell variables whose names match the pattern but hold no secret (PWD: the working folder).
_NOT_SECRET_ENV = frozenset({"PWD", "OLDPWD"})


def is_secret_key(name: str) -> bool:
    """Whether a config/metrics key or an environment variable's name names a secret."""
    return bool(_SECRET_KEY.search(name.replace("__", "_")))


def _env_secrets() -> list[str]:
    """Values of secret-named environment variables (``AWS_SECRET_ACCESS_KEY``, ``*_TOKEN``):
    they are redacted wherever they show up, e.g. passed on through a config key."""
    found = [v for k, v in os.environ.items()
             if len(v) >= _MIN_ENV_SECRET and k not in _NOT_SECRET_ENV and is_secret_key(k)]
    return sorted(found, key=len, reverse=True)  # longest first: no partial leftovers


def redact_text(text: str) -> str:
    """``text`` with URL passwords, ``key=value`` secrets, AWS key ids and the values of
    secret environment variables replaced by :data:`REDACTED`."""
    for secret in _env_secrets():
        if secret in text:
            text = text.replace(secret, REDACTED)
    text = _URL_PASSWORD.sub(rf"\1:{REDACTED}@", text)
    text = _KEY_VALUE.sub(rf"\1\2{REDACTED}", text)
    return _AWS_KEY_ID.sub(REDACTED, text)


def redact(value: Any) -> Any:
    """A copy of ``value`` (nested dicts/lists/strings, e.g. a config) safe to write or show.

    String values under secret-named keys (:func:`is_secret_key`) become :data:`REDACTED`;
    every other string goes through :func:`redact_text`. Non-string values are kept (a key
    such as ``token_dim: 64`` is not a secret), so a redacted config still loads.
    """
    if isinstance(value, Mapping):
        return {k: REDACTED if isinstance(v, str) and v and is_secret_key(str(k))
                else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def is_redacted(text: str) -> bool:
    """Whether a string read back from a dump had a secret taken out."""
    return REDACTED in text


class RedactFilter(logging.Filter):
    """Rewrites each record's message through :func:`redact_text` (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = RedactFilter()


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
    """The logger of module ``name`` (``__name__``), under the ``hirl_ray`` root, with the
    secret filter (records of this logger are redacted whichever handler shows them)."""
    logger = logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger


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
    handler.addFilter(_FILTER)  # also records of modules that use logging.getLogger directly
    root.addHandler(handler)
    root.propagate = False
