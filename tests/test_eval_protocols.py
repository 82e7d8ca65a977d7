"""Tests for the evaluation suite of issue 11: kNN at several k, Fowlkes–Mallows and clustering
of every learned hierarchy level, and the linear probe (``eval/linear.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, fowlkes_mallows_score, normalized_mutual_info_score
from torch import nn
from torch.utils.data import DataLoader

from hirl_ray.config import ConfigError, load_config
from hirl_ray.eval import (
    EvalInputs,
    knn_accuracy,
    knn_predict,
    level_metric_prefixes,
    metric_prefixes,
    run_evaluation,
    run_protocols,
)
from hirl_ray.eval import linear as linear_mod
from hirl_ray.eval.clustering import (
    ClusteringProtocol,
    cluster_accuracy,
    cluster_purity,
    clustering_scores,
    fowlkes_mallows,
    learned_level_prefixes,
)
from hirl_ray.eval.knn import KnnConfig, KnnProtocol, knn_predict_many
from hirl_ray.eval.linear import LinearConfig, stratified_split, train_linear
from hirl_ray.hierarchy.kmeans import PrototypeHierarchy
from tests.test_eval import IndexedImages

torch.set_num_threads(1)

FAST = LinearConfig(epochs=30, lrs=(1.0, 10.0), weight_decays=(0.0, 1e-4), batch_size=64)


def blobs(n_per: int, n_classes: int, dim: int, seed: int, spread: float):
    """Unit-norm Gaussian blobs around fixed random centres (the same for every ``seed``)."""
    centres = np.random.default_rng(0).normal(size=(n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), n_per)
    x = torch.tensor(centres[y] + spread * rng.normal(size=(y.size, dim)), dtype=torch.float32)
    return F.normalize(x, dim=1), y


def feature_inputs(f_train, y_train, f_test, y_test, names, **kw) -> EvalInputs:
    """EvalInputs over ready features (every sample seen)."""
    feats = {"train": f_train, "test": f_test}
    return EvalInputs(y_train, y_test, tuple(names),
                      source=lambda s: (feats[s], np.ones(len(feats[s]), dtype=bool)), **kw)


# ---------------------------------------------------------------- kNN at several k


def test_knn_many_k_equals_one_call_per_k_and_is_chunk_invariant():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(90, 6, generator=g), torch.randn(40, 6, generator=g)
    labels = torch.randint(0, 5, (90,), generator=g)
    ks = (7, 1, 30, 200)  # unsorted, and one above N_train (capped)
    for chunk in (3, 1024):
        many = knn_predict_many(train, labels, test, ks, temperature=0.3, chunk_size=chunk)
        assert many.shape == (4, 40)
        for row, k in zip(many, ks, strict=True):
            assert row.tolist() == knn_predict(train, labels, test, k=k, temperature=0.3).tolist()
    # Different k really give different votes here, so the rows are not one row repeated.
    assert len({tuple(r.tolist()) for r in many}) > 1


def test_knn_protocol_keys_for_a_list_of_k():
    f_tr, y_tr = blobs(30, 4, 8, seed=1, spread=0.8)
    f_te, y_te = blobs(10, 4, 8, seed=2, spread=0.8)
    labels_tr, labels_te = np.stack([y_tr, y_tr // 2], 1), np.stack([y_te, y_te // 2], 1)
    inputs = feature_inputs(f_tr, labels_tr, f_te, labels_te, ("fine", "coarse"))
    cfg = KnnConfig(k=(7, 1, 50))
    out = run_protocols(["knn"], inputs, {"knn": cfg})
    assert KnnProtocol.level_metrics_for(cfg) == ("knn_acc", "knn_acc_k7", "knn_acc_k1",
                                                  "knn_acc_k50")
    assert set(out) == {f"{p}/{lv}" for p in KnnProtocol.level_metrics_for(cfg)
                        for lv in ("fine", "coarse")}
    for j, lv in enumerate(("fine", "coarse")):
        for k in (7, 1, 50):
            assert out[f"knn_acc_k{k}/{lv}"] == knn_accuracy(
                f_tr, labels_tr[:, j], f_te, labels_te[:, j], k=k, temperature=0.07)
        assert out[f"knn_acc/{lv}"] == out[f"knn_acc_k7/{lv}"]  # the first k keeps the key
    # A single k gives exactly today's key, with the same value.
    single = run_protocols(["knn"], inputs, {"knn": KnnConfig(k=7)})
    assert single == {f"knn_acc/{lv}": out[f"knn_acc/{lv}"] for lv in ("fine", "coarse")}
    assert KnnProtocol.level_metrics_for(KnnConfig(k=7)) == ("knn_acc",)


def test_knn_k_list_goes_through_the_loader():
    cfg = load_config(None, {"eval.params.knn.k": [20, 10, 200]})
    assert cfg.eval.params["knn"].ks == (20, 10, 200)
    assert load_config(cfg.to_dict()) == cfg
    assert load_config(None).eval.params["knn"].k == 20  # default unchanged: one int
    for bad in ([10, 10], [], [5, 0]):
        with pytest.raises(ConfigError, match="eval.params.knn.k must be a positive integer or "
                                              "a non-empty list of distinct"):
            load_config(None, {"eval.params.knn.k": bad})


# ---------------------------------------------------------------- Fowlkes–Mallows, purity


@pytest.mark.parametrize("seed, n_classes, n_clusters", [(0, 4, 4), (1, 3, 9), (2, 10, 2)])
def test_fowlkes_mallows_matches_sklearn(seed, n_classes, n_clusters):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, 300)
    pred = np.where(rng.random(300) < 0.6, y % n_clusters, rng.integers(0, n_clusters, 300))
    assert fowlkes_mallows(y, pred) == pytest.approx(fowlkes_mallows_score(y, pred), abs=1e-12)
    assert clustering_scores(y, pred)["fm"] == pytest.approx(fowlkes_mallows_score(y, pred))


def test_fowlkes_mallows_known_cases():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert fowlkes_mallows(y, np.array([7, 7, 3, 3, 5, 5])) == 1.0  # a relabelling
    assert fowlkes_mallows(y, np.arange(6)) == 0.0  # singletons: no pair shares a cluster
    # One cluster: TP = 3 pairs, same-cluster = 15, same-class = 3 -> sqrt(3/15).
    assert fowlkes_mallows(y, np.zeros(6)) == pytest.approx(np.sqrt(3 / 15))


def test_cluster_purity_is_many_to_one():
    y = np.array([0, 0, 0, 1, 1, 1])
    assert cluster_purity(y, np.arange(6)) == 1.0  # singletons are pure
    assert cluster_accuracy(y, np.arange(6)) == pytest.approx(2 / 6)  # one-to-one is not
    assert cluster_purity(y, np.array([0, 0, 1, 1, 2, 2])) == pytest.approx(5 / 6)


# ---------------------------------------------------------------- learned levels


FINE = np.repeat(np.arange(6), 10)
LABELS = np.stack([FINE, FINE // 3], axis=1)  # 6 fine classes in 2 super-classes


def hierarchy(assign0: np.ndarray, parents0: np.ndarray) -> PrototypeHierarchy:
    a0, p0 = torch.tensor(assign0), torch.tensor(parents0)
    k0, k1 = len(parents0), int(parents0.max()) + 1
    return PrototypeHierarchy(version=1, centroids=(torch.eye(k0), torch.eye(k0)[:k1]),
                              parents=(p0,), assignments=(a0, p0[a0]),
                              densities=(torch.ones(k0), torch.ones(k1)))


def test_learned_levels_are_scored_against_every_label_level():
    perm = np.array([3, 0, 5, 1, 4, 2])  # cluster ids need not equal class ids
    parents = np.zeros(6, dtype=np.int64)
    parents[perm] = np.array([1, 1, 1, 0, 0, 0])
    h = hierarchy(perm[FINE], parents)
    inputs = EvalInputs(LABELS, LABELS, ("fine", "coarse"), hierarchy=h)
    out = ClusteringProtocol.learned_levels(inputs)  # needs labels and the tree, no features
    assert set(out) == {f"proto_l{lvl}_{m}/{lv}" for lvl in (0, 1)
                        for m in ("nmi", "ari", "acc", "fm") for lv in ("fine", "coarse")}
    for key in ("proto_l0_nmi/fine", "proto_l0_ari/fine", "proto_l0_fm/fine", "proto_l0_acc/fine",
                "proto_l1_nmi/coarse", "proto_l1_acc/coarse", "proto_l1_fm/coarse"):
        assert out[key] == pytest.approx(1.0), key
    # 6 fine clusters vs 2 coarse classes: accuracy is purity (each cluster is pure) ...
    assert out["proto_l0_acc/coarse"] == 1.0
    # ... 2 coarse clusters vs 6 fine classes: Hungarian, only 2 of 6 classes can be matched.
    assert out["proto_l1_acc/fine"] == pytest.approx(20 / 60)
    a1 = h.assignments[1].numpy()
    assert out["proto_l1_nmi/fine"] == pytest.approx(normalized_mutual_info_score(FINE, a1))
    assert out["proto_l1_ari/fine"] == pytest.approx(adjusted_rand_score(FINE, a1))
    assert out["proto_l1_fm/fine"] == pytest.approx(fowlkes_mallows_score(FINE, a1))


def test_random_learned_level_scores_near_zero_and_unlabelled_rows_are_left_out():
    rng = np.random.default_rng(0)
    fine = rng.integers(0, 6, 3000)
    labels = np.stack([fine, fine // 3], axis=1)
    labels[:500, 1] = -1  # unlabelled at the coarse level
    h = hierarchy(rng.integers(0, 6, 3000), np.array([0, 0, 0, 1, 1, 1]))
    out = ClusteringProtocol.learned_levels(EvalInputs(labels, labels, ("fine", "coarse"),
                                                       hierarchy=h))
    assert abs(out["proto_l0_ari/fine"]) < 0.02 and out["proto_l0_nmi/fine"] < 0.02
    a1, keep = h.assignments[1].numpy(), labels[:, 1] >= 0
    assert out["proto_l1_nmi/coarse"] == pytest.approx(
        normalized_mutual_info_score(labels[keep, 1], a1[keep]))
    assert abs(out["proto_l1_ari/coarse"]) < 0.02


def test_learned_levels_need_a_matching_hierarchy():
    assert ClusteringProtocol.learned_levels(EvalInputs(LABELS, LABELS, ("f", "c"))) == {}
    h = hierarchy(FINE[:30], np.array([0, 0, 0, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"assignments\[0\] has 30 entries but the train split "
                                         "has 60"):
        ClusteringProtocol.learned_levels(EvalInputs(LABELS, LABELS, ("f", "c"), hierarchy=h))


def test_new_prefixes_are_declared():
    clustering = level_metric_prefixes(["clustering"])
    assert clustering == ("nmi", "ari", "acc", "fm", *learned_level_prefixes(4))
    assert clustering[4:8] == ("proto_l0_nmi", "proto_l0_ari", "proto_l0_acc", "proto_l0_fm")
    assert level_metric_prefixes(["linear"]) == ("linear_top1", "linear_top5")
    assert {"fm", "proto_l3_acc", "linear_top1"} <= set(level_metric_prefixes())
    assert "linear_top5" in metric_prefixes()


# ---------------------------------------------------------------- linear probe


def test_linear_probe_separable_features_score_one():
    f_tr, y_tr = blobs(25, 8, 16, seed=1, spread=0.05)
    f_te, y_te = blobs(10, 8, 16, seed=2, spread=0.05)
    inputs = feature_inputs(f_tr, y_tr, f_te, y_te, ("class",))
    out = run_protocols(["linear"], inputs, {"linear": FAST})
    assert out == {"linear_top1/class": 1.0, "linear_top5/class": 1.0}  # 8 > 5 classes


def test_linear_probe_random_features_score_chance():
    g = torch.Generator().manual_seed(3)
    f = F.normalize(torch.randn(1000, 32, generator=g), dim=1)
    y = torch.randint(0, 4, (1000,), generator=g).numpy()
    inputs = feature_inputs(f[:600], y[:600], f[600:], y[600:], ("class",))
    out = run_protocols(["linear"], inputs, {"linear": FAST})
    assert set(out) == {"linear_top1/class"}  # 4 classes: top-5 would be 1.0 by construction
    assert abs(out["linear_top1/class"] - 0.25) < 0.07


def test_linear_probe_matches_sklearn_on_ill_conditioned_features():
    # Non-negative features with a shared offset and per-dimension scales over two decades,
    # as unit-norm ReLU backbone features are: plain SGD on them lags L-BFGS logistic
    # regression by 20 points (0.66 vs 0.86 here); standardised first, it does not.
    rng = np.random.default_rng(0)
    centres, scales = rng.normal(size=(8, 64)), 10 ** rng.uniform(-2, 0, 64)
    y = rng.integers(0, 8, 1400)
    x = np.abs(10.0 + (centres[y] + 2.0 * rng.normal(size=(1400, 64))) * scales)
    f = F.normalize(torch.tensor(x, dtype=torch.float32), dim=1)
    inputs = feature_inputs(f[:1000], y[:1000], f[1000:], y[1000:], ("class",))
    ours = run_protocols(["linear"], inputs)["linear_top1/class"]  # default config
    ref = max(LogisticRegression(C=c, max_iter=5000).fit(f[:1000].numpy(), y[:1000])
              .score(f[1000:].numpy(), y[1000:]) for c in (1.0, 10.0, 100.0, 1000.0))
    assert ref > 0.7 and ours >= ref - 0.03


def test_stratified_split_is_disjoint_balanced_and_seeded():
    y = np.array([0] * 50 + [1] * 20 + [2] * 2 + [3])
    fit, val = stratified_split(y, 0.2, seed=0)
    assert np.intersect1d(fit, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(y.size))
    assert [int((y[val] == c).sum()) for c in range(4)] == [10, 4, 1, 0]  # singleton stays
    again, other = stratified_split(y, 0.2, seed=0), stratified_split(y, 0.2, seed=1)
    assert np.array_equal(again[1], val) and not np.array_equal(other[1], val)


def test_linear_sweep_sees_only_train_features(monkeypatch):
    f_tr, y_tr = blobs(20, 6, 12, seed=1, spread=0.6)
    f_te, y_te = blobs(10, 6, 12, seed=2, spread=0.6)
    train_rows = {r.tobytes() for r in f_tr.numpy()}
    test_rows = {r.tobytes() for r in f_te.numpy()}
    seen: list[tuple[str, str]] = []  # (function, "train" | "test") per call, in order

    def origin(x: torch.Tensor) -> str:
        rows = {r.tobytes() for r in x.cpu().numpy()}
        assert rows <= train_rows or rows <= test_rows, "a call mixed train and test rows"
        return "train" if rows <= train_rows else "test"

    def spy(name, fn):
        def wrapped(*args, **kw):
            x = args[0] if name == "train_linear" else args[2]
            seen.append((name, origin(x)))
            return fn(*args, **kw)
        monkeypatch.setattr(linear_mod, name, wrapped)

    chosen = []
    select = linear_mod.select_hyperparameters
    monkeypatch.setattr(linear_mod, "select_hyperparameters",
                        lambda *a, **kw: chosen.append(select(*a, **kw)) or chosen[-1])
    spy("train_linear", linear_mod.train_linear)
    spy("score_linear", linear_mod.score_linear)
    inputs = feature_inputs(f_tr, y_tr, f_te, y_te, ("class",))
    run_protocols(["linear"], inputs, {"linear": FAST})
    # Sweep: train on the fit part, score the validation part, retrain on all of train —
    # all train rows; the test split is scored once, last.
    assert seen == [("train_linear", "train"), ("score_linear", "train"),
                    ("train_linear", "train"), ("score_linear", "test")]
    # And the choice does not move when the test split changes completely.
    noise = F.normalize(torch.randn(60, 12, generator=torch.Generator().manual_seed(9)), dim=1)
    inputs = feature_inputs(f_tr, y_tr, noise, np.zeros(60, dtype=np.int64), ("class",))
    test_rows = {r.tobytes() for r in noise.numpy()}
    run_protocols(["linear"], inputs, {"linear": FAST})
    assert chosen[0] == chosen[1]


def test_linear_probe_is_reproducible_with_the_seed():
    f, y = blobs(30, 6, 12, seed=4, spread=0.8)
    y_t = torch.from_numpy(y)
    w1, b1 = train_linear(f, y_t, 6, [1.0, 10.0], [0.0, 1e-4], epochs=5, batch_size=32, seed=0)
    w2, b2 = train_linear(f, y_t, 6, [1.0, 10.0], [0.0, 1e-4], epochs=5, batch_size=32, seed=0)
    w3, _ = train_linear(f, y_t, 6, [1.0, 10.0], [0.0, 1e-4], epochs=5, batch_size=32, seed=1)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    assert not torch.equal(w1, w3)  # the seed sets the batch order
    f_te, y_te = blobs(10, 6, 12, seed=5, spread=0.8)
    runs = [run_protocols(["linear"], feature_inputs(f, y, f_te, y_te, ("c",), seed=s),
                          {"linear": FAST}) for s in (0, 0)]
    assert runs[0] == runs[1]


def test_linear_batched_sweep_equals_one_classifier_at_a_time():
    f, y = blobs(20, 5, 10, seed=6, spread=0.7)
    y_t = torch.from_numpy(y)
    w, b = train_linear(f, y_t, 5, [0.5, 5.0], [1e-3, 0.0], epochs=4, batch_size=16, seed=2)
    for g, (lr, wd) in enumerate([(0.5, 1e-3), (5.0, 0.0)]):
        w1, b1 = train_linear(f, y_t, 5, [lr], [wd], epochs=4, batch_size=16, seed=2)
        assert torch.allclose(w[g], w1[0], atol=1e-5) and torch.allclose(b[g], b1[0], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_linear_probe_on_gpu_matches_cpu():
    f, y = blobs(30, 6, 12, seed=7, spread=0.5)
    y_t = torch.from_numpy(y)
    cpu = train_linear(f, y_t, 6, [1.0], [1e-4], epochs=10, batch_size=32, seed=0)
    gpu = train_linear(f, y_t, 6, [1.0], [1e-4], epochs=10, batch_size=32, seed=0, device="cuda")
    assert torch.allclose(cpu[0], gpu[0].cpu(), atol=1e-4)


@pytest.mark.parametrize("key, value, message", [
    ("val_fraction", 1.0, r"eval.params.linear.val_fraction must be in \(0, 1\), got 1.0"),
    ("lrs", [], "eval.params.linear.lrs must be a non-empty list of numbers > 0"),
    ("weight_decays", [-1.0], "eval.params.linear.weight_decays must be a non-empty list"),
    ("epochs", 0, "eval.params.linear.epochs must be > 0"),
    ("lr", 0.1, "unknown key eval.params.linear.lr; valid keys: batch_size, epochs, lrs"),
])
def test_linear_config_errors_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"eval.protocols": ["linear"], f"eval.params.linear.{key}": value})


# ---------------------------------------------------------------- end to end


class CountingLoader:
    def __init__(self, images: torch.Tensor):
        self.loader = DataLoader(IndexedImages(images), batch_size=16, shuffle=True,
                                 generator=torch.Generator().manual_seed(0))
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.loader)


def test_all_protocols_with_linear_run_end_to_end():
    assert "linear" not in load_config(None).eval.protocols  # opt-in
    cfg = load_config(None, {"eval.protocols": ["knn", "clustering", "consistency", "linear"],
                             "eval.params.knn.k": [5, 20], "eval.params.linear.epochs": 20,
                             "eval.params.linear.lrs": [1.0, 10.0]}).eval
    f_tr, _ = blobs(10, 6, 48, seed=1, spread=0.1)
    f_te, y_te = blobs(5, 6, 48, seed=2, spread=0.1)
    y_te = np.stack([y_te, y_te // 3], axis=1)
    train = CountingLoader(f_tr.reshape(-1, 3, 4, 4))
    test = CountingLoader(f_te.reshape(-1, 3, 4, 4))
    h = hierarchy(FINE, np.array([0, 0, 0, 1, 1, 1]))
    out = run_evaluation(nn.Flatten(), cfg, train, test, LABELS, y_te, ["fine", "coarse"],
                         hierarchy=h)
    assert train.passes == 1 and test.passes == 1  # one extraction shared by all four
    levels = ("fine", "coarse")
    expected = {f"{p}/{lv}" for lv in levels for p in (
        "knn_acc", "knn_acc_k5", "knn_acc_k20", "nmi", "ari", "acc", "fm", "linear_top1",
        *learned_level_prefixes(2))}
    expected |= {"linear_top5/fine"}  # 6 fine classes; 2 coarse ones get no top-5
    assert {k for k in out if not k.startswith("hierarchy/")} == expected
    assert "hierarchy/path_accuracy" in out
    assert out["linear_top1/fine"] == 1.0 and out["knn_acc/coarse"] == 1.0
    assert out["nmi/fine"] > 0.95 and out["proto_l0_nmi/fine"] == 1.0


def test_sweep_metrics_follow_the_configured_protocols():
    """A tune.metric is checked against what the experiment's eval.protocols report under
    their settings: knn_acc_k10 exists only when knn's k lists 10."""
    from hirl_ray.eval.protocol import level_metric_prefixes
    from hirl_ray.sweep.sampling import check_against, search_params

    def sweep(metric: str, **overrides):
        cfg = load_config(None, {"tune": {"metric": metric, "num_trials": 1}, **overrides})
        spec = cfg.section("tune")
        check_against(spec, search_params(spec, cfg), cfg, 2400, ("subclass", "class"))

    single = load_config(None).eval
    several = load_config(None, {"eval.params.knn.k": [20, 10]}).eval
    assert "knn_acc_k10" not in level_metric_prefixes(single.protocols, single.params)
    assert "knn_acc_k10" in level_metric_prefixes(several.protocols, several.params)
    sweep("knn_acc_k10/class", **{"eval.params.knn.k": [20, 10]})
    with pytest.raises(ConfigError, match="no protocol in eval.protocols .* reports knn_acc_k10"):
        sweep("knn_acc_k10/class")
    with pytest.raises(ConfigError, match="reports linear_top1"):
        sweep("linear_top1/class")
    sweep("linear_top1/class", **{"eval.protocols": ["knn", "linear"]})
