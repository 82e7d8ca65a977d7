"""How well a learned prototype tree (HIRL, Sec. 3.1) matches a known label tree.

The ``consistency`` protocol scores the run's prototype hierarchy (its per-level cluster
assignments of the training samples and its parent maps) against the train split's label
tree; it needs no features. Without a hierarchy or without labels it produces nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hirl_ray.eval.clustering import _contingency, _np
from hirl_ray.eval.protocol import EvalInputs, EvalProtocol, register_protocol


def _majority(clusters: np.ndarray, labels: np.ndarray) -> tuple[dict[int, int], float]:
    """Majority label of every cluster, and purity = sum of majority counts / N."""
    table = _contingency(labels, clusters)
    cluster_ids, label_ids = np.unique(clusters), np.unique(labels)
    best = table.argmax(axis=1)
    mapping = {int(c): int(label_ids[b]) for c, b in zip(cluster_ids, best, strict=True)}
    return mapping, float(table.max(axis=1).sum() / clusters.size)


def hierarchy_consistency(
    parents: Sequence[np.ndarray], assignments: Sequence[np.ndarray], labels: np.ndarray
) -> dict[str, float]:
    """Agreement between a learned prototype tree and a known label tree.

    Levels are finest-first on both sides. Learned level ``l`` has ``assignments[l]``
    (``(N,)`` cluster of each sample) and, below the top, ``parents[l]`` (``(K_l,)`` index of
    the parent prototype at level ``l + 1``; an extra top-level entry is ignored). Label
    level ``j`` is ``labels[:, j]``; the true label tree is read off the labels (the parent
    of fine class ``y`` is the majority coarse label of its samples, unique for a real tree).

    Metrics:

    * ``purity/l{l}_vs_y{j}``: for every pair of levels, the fraction of samples whose
      label at level ``j`` equals the majority label of their level-``l`` cluster.
    * ``path_consistency``: learned level ``l`` is aligned with label level ``l`` for the
      first ``M = min(#learned, #label)`` levels. Each sample's prototype path is chained
      from its finest cluster through ``parents`` (as HIRL's semantic paths are, Sec. 3.2),
      each cluster on it is replaced by its majority label at the aligned level, and the
      sample counts if that label path follows the true tree (each label's true parent is
      the next label). With ``M = 1`` every path is trivially consistent.
    * ``path_accuracy``: fraction of samples whose mapped label path equals their own true
      label path over the ``M`` aligned levels (stricter than consistency).

    Args:
        parents: Parent maps of the learned tree; numpy arrays or torch tensors.
        assignments: Per-level cluster assignments of the same ``N`` samples.
        labels: ``(N, L)`` integer labels, column 0 finest.

    Returns:
        Flat ``{metric: value}`` dict, all values in ``[0, 1]``; ``{}`` if ``L == 0``.
    """
    y = _np(labels)
    y = y.reshape(-1, 1) if y.ndim == 1 else y
    assign = [_np(a).reshape(-1).astype(np.int64) for a in assignments]
    par = [_np(p).reshape(-1).astype(np.int64) for p in parents]
    if y.shape[1] == 0 or not assign:
        return {}
    n = y.shape[0]
    if any(a.size != n for a in assign) or len(par) < len(assign) - 1:
        raise ValueError(
            f"hierarchy_consistency: need {len(assign)} assignment arrays of length N={n} "
            f"and >= {len(assign) - 1} parent maps, got lengths {[a.size for a in assign]} "
            f"and {len(par)} parent maps"
        )
    out: dict[str, float] = {}
    majority: list[dict[int, int]] = []
    for lvl, a in enumerate(assign):
        for j in range(y.shape[1]):
            mapping, purity = _majority(a, y[:, j])
            out[f"purity/l{lvl}_vs_y{j}"] = purity
            if j == lvl:
                majority.append(mapping)
    m = len(majority)  # = min(#learned levels, #label levels)

    # Chained prototype path, starting from the finest assignment.
    path = [assign[0]]
    for lvl in range(m - 1):
        if path[-1].max() >= par[lvl].size:
            raise ValueError(
                f"hierarchy_consistency: assignments reach cluster {path[-1].max()} at level "
                f"{lvl} but parents[{lvl}] has only {par[lvl].size} entries"
            )
        path.append(par[lvl][path[-1]])
    # Clusters reached by chaining but holding no sample at that level map to label -1.
    mapped = [np.array([majority[i].get(int(c), -1) for c in p]) for i, p in enumerate(path)]

    consistent = np.ones(n, dtype=bool)
    for j in range(m - 1):
        true_parent, _ = _majority(y[:, j], y[:, j + 1])  # fine label -> coarse label
        parent_of = np.array([true_parent.get(int(c), -2) for c in mapped[j]])
        consistent &= parent_of == mapped[j + 1]
    exact = np.all(np.stack(mapped, axis=1) == y[:, :m], axis=1)
    out["path_consistency"] = float(consistent.mean())
    out["path_accuracy"] = float(exact.mean())
    return out


@register_protocol
class ConsistencyProtocol(EvalProtocol):
    """``hierarchy/<metric>``: :func:`hierarchy_consistency` of ``inputs.hierarchy`` against
    the train labels (``hierarchy/purity/l0_vs_y1``, ``hierarchy/path_consistency``, ...)."""

    name = "consistency"
    metric_prefixes = ("hierarchy",)

    def run(self, inputs: EvalInputs) -> dict[str, float]:
        h = inputs.hierarchy
        if h is None or inputs.train_labels.shape[1] == 0:
            return {}
        out = hierarchy_consistency(h.parents, h.assignments, inputs.train_labels)
        return {f"hierarchy/{k}": v for k, v in out.items()}
