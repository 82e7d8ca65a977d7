"""TensorBoard event files of a fit, in ``<run>/tensorboard`` (tensorboardX).

tensorboardX writes to a local folder. For a remote run folder (``s3://``) the events are
written to a local temporary folder and copied with :mod:`hirl_ray.storage` (the AWS chain and
``AWS_ENDPOINT_URL`` that storage uses everywhere else) at every :meth:`TensorBoardLog.sync`:
after each epoch. Event files only grow, so each copy replaces the object with a longer one;
a resumed fit writes a new event file next to the old ones and TensorBoard joins them.
No Ray here.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hirl_ray import storage
from hirl_ray.logs import get_logger
from hirl_ray.runs import LAYOUT
from hirl_ray.train.observe import curve_values

log = get_logger(__name__)


class TensorBoardLog:
    """Scalars and figures for TensorBoard under ``LAYOUT.tensorboard_dir(run_dir)``."""

    kind = "tensorboard"

    def __init__(self, run_dir: str, flush_secs: int = 30) -> None:
        from tensorboardX import SummaryWriter

        self.target = LAYOUT.tensorboard_dir(run_dir)
        self.remote = storage.is_remote(self.target)
        self.local = Path(tempfile.mkdtemp(prefix="hirl_ray_tb_")) if self.remote \
            else Path(storage.resolve(self.target))
        self.writer = SummaryWriter(str(self.local), flush_secs=flush_secs)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """``values`` as scalars at ``step``; non-finite and non-numbers are left out."""
        for tag, value in curve_values(values).items():
            self.writer.add_scalar(tag, value, step)

    def figure(self, tag: str, figure: Any, step: int) -> None:
        """A matplotlib figure as an image (the caller closes it)."""
        self.writer.add_figure(tag, figure, step, close=False)

    def sync(self) -> None:
        """Flush; for a remote run folder copy the event files there."""
        self.writer.flush()
        if not self.remote:
            return
        for path in self.local.rglob("*"):
            if path.is_file():
                rel = path.relative_to(self.local).as_posix()
                try:
                    storage.upload_file(path, storage.join(self.target, rel))
                except OSError as e:  # the next epoch copies again
                    log.warning("could not copy TensorBoard events to %s: %s", self.target, e)
                    return

    def close(self, state: str = "finished") -> None:
        """Flush, copy (remote) and close; ``state`` is not recorded here."""
        self.sync()
        self.writer.close()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
