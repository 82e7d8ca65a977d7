"""Rank 0's view of a running fit: progress, TensorBoard, metrics and ``status.json``.

:class:`RunObserver` is the loop's :class:`~hirl_ray.train.loop.StepObserver`. After each step
it decides, from host clocks and counters only, whether to show something; only then does it
read the step's losses and gradient norm (a host sync on a GPU, so at most once per shown
step, never once per step). What it shows:

* progress: a plain line at least every ``train.progress_every_s`` seconds (and every
  ``train.progress_every_steps`` steps) — step, samples/s, loss terms, lr, hierarchy state, ETA
  of the epoch and of the run — or, given a tqdm-like ``bar``, that line as the bar's
  description (a Ray worker's output is never a terminal: the worker uses lines);
* boards — TensorBoard (``observe.tensorboard``), an MLflow run (``observe.mlflow``) and a
  W&B run (``observe.wandb``):
  step scalars every ``observe.every_steps`` steps, epoch scalars, the prototype tree at every
  new hierarchy version, the same to each;
* a metrics sink (the Ray metrics of :mod:`hirl_ray.train.ray_metrics`), injected;
* ``status.json`` (:mod:`hirl_ray.status`) at least every ``observe.status_every_s``.

No Ray here: the worker passes in the Ray-specific parts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from hirl_ray import status as run_status
from hirl_ray.config import ExperimentConfig
from hirl_ray.hierarchy import PrototypeHierarchy
from hirl_ray.logs import get_logger, redact_text
from hirl_ray.train.loop import EpochStats, StepView

log = get_logger(__name__)

Sink = Callable[[Mapping[str, float]], None]


def curve_values(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` (booleans, NaN, infinities and text are not curves)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and v == v and abs(v) != float("inf")}


class Tracker:
    """Base of the optional trackers' boards (MLflow, W&B): a call that fails costs one
    warning per board, never the run; later calls are tried again."""

    name = "tracker"
    _warned = False

    def _safely(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - a tracker never stops training
            if not self._warned:
                log.warning("%s: could not log %s (%s: %s); training goes on, later values are "
                            "tried again", self.name, what, type(e).__name__,
                            redact_text(str(e))[:200])
                self._warned = True


class Board(Protocol):
    """Where curves go: :class:`~hirl_ray.train.tensorboard.TensorBoardLog`,
    :class:`~hirl_ray.train.mlflow_log.MlflowLog`, :class:`~hirl_ray.train.wandb_log.WandbLog`."""

    kind: str  # status.json key of ``target`` ("tensorboard", "mlflow", "wandb")
    target: str  # where to look (a folder, a tracking URI and run id)

    def scalars(self, values: Mapping[str, float], step: int) -> None: ...

    def figure(self, tag: str, figure: Any, step: int) -> None: ...

    def sync(self) -> None: ...

    def close(self, state: str = "finished") -> None: ...

#: Epoch metrics that are bookkeeping for a resume, not curves (kept out of TensorBoard).
NOT_CURVES = ("epoch", "hierarchy_attempt", "hierarchy_pending_round", "hierarchy_building")


def hierarchy_state(source: Any, enabled: bool = True) -> str:
    """``warm-up``, ``v3``, ``v3, building v4`` or ``off`` for a hierarchy source."""
    if not enabled or source is None:
        return "off"
    current = getattr(source, "current", None)
    version = current.version if current is not None else 0
    shown = f"v{version}" if version else "warm-up"
    if getattr(source, "building", False):
        shown += f", building v{version + 1}"
    return shown


def cluster_stats(h: PrototypeHierarchy) -> dict[str, float]:
    """Per level: clusters, empty clusters, largest and smallest non-empty size (samples)."""
    out: dict[str, float] = {"hierarchy/version": float(h.version)}
    for level, k in enumerate(h.num_clusters):
        a = h.assignments[level]
        counts = torch.bincount(a[a >= 0], minlength=k).cpu()
        nonempty = counts[counts > 0]
        out[f"hierarchy/level{level}/clusters"] = float(k)
        out[f"hierarchy/level{level}/empty"] = float((counts == 0).sum())
        out[f"hierarchy/level{level}/largest"] = float(counts.max())
        out[f"hierarchy/level{level}/smallest"] = float(nonempty.min()) if len(nonempty) else 0.0
    return out


def _clock_text(seconds: float) -> str:
    s = int(max(0.0, seconds))
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class RunObserver:
    """Progress, TensorBoard, metrics and status of one fit, on rank 0.

    Args:
        cfg: The experiment (``train.progress_every_*``, ``observe.*``, ``train.epochs``).
        run_dir: The run folder (status.json, tensorboard/).
        world: Workers (samples/s counts all of them).
        hierarchy: Returns the hierarchy state text (:func:`hierarchy_state`).
        bar: A tqdm-like class (``total``, ``desc``; ``update``, ``set_description``,
            ``close``), or ``None`` for plain lines.
        sink: Receives the key figures at shown steps and epoch ends (Ray metrics).
        boards: TensorBoard's event writer, an MLflow run, ... (may be empty).
        clock: Monotonic seconds (tests pass a fake one).
        emit: Where plain lines go.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: str, *, world: int,
                 hierarchy: Callable[[], str], bar: Callable[..., Any] | None = None,
                 sink: Sink | None = None, boards: Sequence[Board] = (),
                 clock: Callable[[], float] = time.monotonic,
                 emit: Callable[[str], None] = log.info) -> None:
        self.cfg, self.run_dir, self.world = cfg, run_dir, world
        self.hierarchy, self.bar_factory, self.sink = hierarchy, bar, sink
        self.boards, self.clock, self.emit = tuple(boards), clock, emit
        self.every_s = cfg.train.progress_every_s
        self.every_steps = cfg.train.progress_every_steps
        self.tb_every = cfg.observe.every_steps
        self.status_every_s = cfg.observe.status_every_s
        self._bar: Any = None
        self._epoch = -1
        self._epoch_start = self._last_line = self._last_status = clock()
        self._window: list[float] = [0.0, 0.0, 0]  # data wait s, compute s, steps since TB
        self._tb_last = (clock(), 0)  # time, samples at the last TB write
        self._drawn_version = 0
        self.status: dict[str, Any] = {"state": "running", "epochs": cfg.train.epochs,
                                       "epoch": 0, "step": 0}
        for board in self.boards:
            self.status[board.kind] = board.target

    # ---- per step ----
    def begin_epoch(self, epoch: int, steps_per_epoch: int) -> None:
        self._epoch = epoch
        self._epoch_start = self._last_line = self.clock()
        self._tb_last = (self._epoch_start, 0)
        if self.bar_factory is not None:
            self._bar = self.bar_factory(total=steps_per_epoch, unit="step",
                                         desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}")

    def on_step(self, v: StepView) -> None:
        now = self.clock()
        self._window[0] += v.data_s
        self._window[1] += v.compute_s
        self._window[2] += 1
        if self._bar is not None:
            self._bar.update(1)
        line = now - self._last_line >= self.every_s or (
            self.every_steps > 0 and v.steps % self.every_steps == 0)
        tb = bool(self.boards) and v.step % self.tb_every == 0
        sink = self.sink is not None and line
        status = now - self._last_status >= self.status_every_s
        if not (line or tb or sink or status):
            return
        values = self._read(v, now)  # the one host read of this step's tensors
        if line:
            self._last_line = now
            text = self._line(v, values)
            if self._bar is not None:
                self._bar.set_description(text)
            else:
                self.emit(text)
        if tb:
            t, samples = self._tb_last
            steps = max(1, int(self._window[2]))
            step_values = {**values, "time/data_wait_s": self._window[0] / steps,
                           "time/compute_s": self._window[1] / steps,
                           "throughput/samples_per_s":
                               (v.samples - samples) * self.world / max(now - t, 1e-9)}
            if torch.cuda.is_available() and v.losses.is_cuda:
                step_values["gpu/memory_allocated_gb"] = torch.cuda.memory_allocated() / 1e9
                step_values["gpu/max_memory_allocated_gb"] = \
                    torch.cuda.max_memory_allocated() / 1e9
            for board in self.boards:
                board.scalars(step_values, v.step)
            self._window = [0.0, 0.0, 0]
            self._tb_last = (now, v.samples)
        if sink:
            assert self.sink is not None
            self.sink(values)
        if status:
            self._write_status(now)

    def _read(self, v: StepView, now: float) -> dict[str, float]:
        loss, ssl, semantic = v.losses.tolist()
        elapsed = max(now - self._epoch_start, 1e-9)
        per_step = elapsed / max(v.steps, 1)
        values = {"loss/total": loss, "loss/ssl": ssl, "lr": v.lr,
                  "throughput/epoch_samples_per_s": v.samples * self.world / elapsed}
        if v.semantic:
            values["loss/semantic"] = semantic
        if v.grad_norm is not None:
            values["grad_norm"] = float(v.grad_norm)
        self.status.update(
            epoch=v.epoch, step=v.step, epoch_step=v.steps, steps_per_epoch=v.steps_per_epoch,
            total_steps=v.total_steps, loss=loss, ssl_loss=ssl,
            semantic_loss=semantic if v.semantic else None, lr=v.lr,
            samples_per_s=values["throughput/epoch_samples_per_s"],
            eta_epoch_s=max(0, v.steps_per_epoch - v.steps) * per_step,
            eta_run_s=max(0, v.total_steps - v.step) * per_step)
        return values

    def _line(self, v: StepView, values: Mapping[str, float]) -> str:
        s = self.status
        sem = f" semantic {values['loss/semantic']:.3f}" if "loss/semantic" in values else ""
        pct = 100.0 * v.steps / max(v.steps_per_epoch, 1)
        return (f"epoch {v.epoch + 1}/{self.cfg.train.epochs} step {v.steps}/"
                f"{v.steps_per_epoch} ({pct:.0f}%) | loss {values['loss/total']:.3f} ssl "
                f"{values['loss/ssl']:.3f}{sem} | lr {v.lr:.2e} | "
                f"{values['throughput/epoch_samples_per_s']:,.0f} samples/s | hierarchy "
                f"{self.hierarchy()}{self._rebuild_text()} | ETA epoch "
                f"{_clock_text(s['eta_epoch_s'])}, run {_clock_text(s['eta_run_s'])}")

    def _rebuild_text(self) -> str:
        r = self.status.get("last_rebuild")
        return f" (last rebuild v{r['version']} {r['seconds']:.1f}s)" if r else ""

    def _write_status(self, now: float) -> None:
        self._last_status = now
        self.status["hierarchy"] = {"state": self.hierarchy()}
        try:
            run_status.write_status(self.run_dir, self.status)
        except OSError as e:  # a status file is not worth stopping a run for
            log.warning("could not write %s: %s", run_status.status_file(self.run_dir), e)

    # ---- per epoch ----
    def end_epoch(self, stats: EpochStats, step: int, metrics: Mapping[str, Any], *,
                  hierarchy: PrototypeHierarchy | None, rebuild: Mapping[str, Any] | None,
                  checkpoint: str | None,
                  tree: Callable[[PrototypeHierarchy], Any] | None = None) -> None:
        """Epoch scalars, the tree picture of a new hierarchy, status; ``rebuild``: the
        actor's last rebuild telemetry (``PrototypeActor.status()['last_rebuild']``)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        epoch = stats.epoch + 1
        values: dict[str, float] = {f"epoch/{k}": v for k, v in metrics.items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if hierarchy is not None:
            values.update(cluster_stats(hierarchy))
        if rebuild:
            values["rebuild/seconds"] = rebuild["seconds"]
            values.update({f"rebuild/{k}_s": t for k, t in rebuild["phases"].items()})
            values["rebuild/peak_rss_gb"] = rebuild["peak_rss_gb"]
            values["rebuild/superseded_rounds"] = rebuild.get("superseded", 0)
            self.status["last_rebuild"] = dict(rebuild)
        curves = {k: v for k, v in values.items() if k.removeprefix("epoch/") not in NOT_CURVES}
        for board in self.boards:
            board.scalars(curves, epoch)
        if self.boards and hierarchy is not None and tree is not None \
                and hierarchy.version > self._drawn_version:
            self._draw(tree, hierarchy)
        for board in self.boards:
            board.sync()
        if self.sink is not None:
            self.sink(values)
        self.status.update(epoch=epoch, step=step,
                           epoch_step=stats.steps, samples_per_s=stats.samples_per_s * self.world,
                           epoch_s=stats.seconds, loss=stats.loss, ssl_loss=stats.method_loss,
                           semantic_loss=stats.semantic_loss, eta_epoch_s=0.0,
                           eta_run_s=stats.seconds * (self.cfg.train.epochs - epoch),
                           last_checkpoint=checkpoint)
        self._write_status(self.clock())

    def _draw(self, tree: Callable[[PrototypeHierarchy], Any],
              hierarchy: PrototypeHierarchy) -> None:
        """The prototype tree, drawn once, to every board."""
        import matplotlib.pyplot as plt

        try:
            figure = tree(hierarchy)
            try:
                for board in self.boards:
                    board.figure("hierarchy/prototype_tree", figure, hierarchy.version)
            finally:
                plt.close(figure)  # also when a board failed: figures stay open until closed
            self._drawn_version = hierarchy.version
        except Exception as e:  # noqa: BLE001 - a picture never stops training
            log.warning("could not draw the prototype tree: %s", e)

    def close(self, state: str = "finished") -> None:
        """Close the bar and the boards; ``state``: how the fit ended (finished, stopped,
        failed), which MLflow and W&B runs record."""
        if self._bar is not None:
            self._bar.close()
        for board in self.boards:
            board.close(state)
