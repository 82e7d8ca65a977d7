"""Graceful stop of a fit: SIGTERM or Ctrl-C (SIGINT) ends it at the next safe point.

The safe point is the end of an epoch: a checkpoint stores completed epochs, the global step
and the hierarchy version, not a position inside the sampler's order, so only an epoch
boundary resumes exactly. The first signal lets the current epoch finish and its checkpoint
be written, then every rank leaves the loop (:func:`run_epochs`); the driver raises
:class:`Interrupted` with a one-line message, and the same command resumes. A second signal
stops at once (``KeyboardInterrupt``): saved epochs are kept, the current one is redone.

The driver (:mod:`hirl_ray.train.ray_fit`) holds the signal handlers; workers learn of the
request through a small Ray actor that rank 0 asks at the end of each epoch (one call per
epoch, none per step), and all ranks agree on stopping so their collectives stay matched.
No Ray here.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from hirl_ray.logs import get_logger

log = get_logger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(RuntimeError):
    """A fit stopped by SIGINT/SIGTERM after saving its checkpoint; rerun to resume.

    ``signum``: the signal; ``epoch``: epochs completed and saved; ``checkpoint``: the newest.
    """

    def __init__(self, message: str, signum: int, epoch: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.signum, self.epoch, self.checkpoint = signum, epoch, checkpoint

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class StopRequest:
    """SIGINT/SIGTERM handlers for the duration of a ``with`` block (main thread only).

    Args:
        notify: Called once with the signal number on the first signal, in a new thread (a
            signal handler must not block on Ray); tells the workers.
    """

    def __init__(self, notify: Callable[[int], Any] | None = None) -> None:
        self.notify = notify
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
        self.signum = signum
        log.warning("%s received: finishing the current epoch and saving its checkpoint, then "
                    "stopping (send it again to stop at once; the current epoch is then "
                    "redone on resume)", signal.Signals(signum).name)
        if self.notify is not None:
            threading.Thread(target=self._notify, args=(signum,), name="hirl-ray-stop",
                             daemon=True).start()

    def _notify(self, signum: int) -> None:
        try:
            self.notify(signum)  # type: ignore[misc]
        except Exception as e:  # noqa: BLE001 - the workers then finish the run
            log.warning("could not tell the workers to stop (%s); training goes on", e)


def run_epochs(first: int, last: int, epoch_fn: Callable[[int], None],
               stop_requested: Callable[[], bool]) -> int:
    """Run ``epoch_fn(epoch)`` for ``first..last-1``, stopping after an epoch when asked.

    ``epoch_fn`` trains one epoch and reports its checkpoint; ``stop_requested`` is asked
    after each epoch but the last (a collective in the worker: every rank calls it and gets
    the same answer). Returns the epochs completed.
    """
    for epoch in range(first, last):
        epoch_fn(epoch)
        if epoch + 1 < last and stop_requested():
            return epoch + 1
    return max(first, last)


def run_in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a daemon thread while the main thread waits.

    The main thread stays free to run signal handlers, and Ray Train's ``fit()`` (which
    replaces the SIGINT handler with one that aborts the run when called on the main thread)
    leaves ours in place. Exceptions of ``fn`` are re-raised here.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, name="hirl-ray-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box.get("value")
