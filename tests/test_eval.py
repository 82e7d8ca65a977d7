"""Tests for hirl_ray.eval: features, weighted kNN, clustering metrics, hierarchy, report,
the protocol runner and the ``eval:`` section."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    adjusted_rand_score,
    fowlkes_mallows_score,
    normalized_mutual_info_score,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hirl_ray.config import PROTOCOLS, ConfigError, load_config
from hirl_ray.eval import (
    EvalInputs,
    cluster_accuracy,
    clustering_scores,
    dedup_by_index,
    eval_mode,
    evaluate,
    extract_features,
    hierarchy_consistency,
    kmeans_labels,
    knn_accuracy,
    knn_predict,
    level_metric_prefixes,
    metric_prefixes,
    run_evaluation,
    run_protocols,
)
from hirl_ray.hierarchy.kmeans import PrototypeHierarchy

torch.set_num_threads(1)


def blobs(n_per: int, n_classes: int, dim: int, seed: int, spread: float = 0.1):
    """Gaussian blobs around random unit centres; returns (x float32, y int64)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(n_classes), n_per)
    x = centres[y] + spread * rng.normal(size=(y.size, dim))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


class IndexedImages(Dataset):
    """Items are (image, dataset index), like data.ViewDataset with an eval transform."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i


# ---------------------------------------------------------------- kNN


def test_knn_separated_blobs_is_near_perfect():
    x, y = blobs(60, 5, 16, seed=0)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:200], perm[200:]
    acc = knn_accuracy(x[train], y[train], x[test], y[test])
    assert acc >= 0.99


def test_knn_random_labels_is_chance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1200, 8, generator=g)
    y = torch.randint(0, 4, (1200,), generator=g)
    acc = knn_accuracy(x[:800], y[:800], x[800:], y[800:])
    assert abs(acc - 0.25) < 0.08


def test_knn_weighting_overrides_majority_vote():
    # Query at angle 0. One class-0 neighbour at cosine 1.0, two class-1 neighbours at
    # cosine 0.5. Majority vote (k=3) says 1; exp(sim/T) weights with T=0.07 give class 0
    # exp(14.3) vs 2*exp(7.1) for class 1. With a huge T weights are ~equal -> majority.
    train = torch.tensor([[1.0, 0.0], [0.5, 0.75**0.5], [0.5, -(0.75**0.5)]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train, labels, query, k=3, temperature=0.07).tolist() == [0]
    assert knn_predict(train, labels, query, k=3, temperature=1e4).tolist() == [1]
    # k caps at N_train, and with k=1 only the nearest counts.
    assert knn_predict(train, labels, query, k=50, temperature=1e4).tolist() == [1]
    assert knn_predict(train, labels, query, k=1, temperature=1e4).tolist() == [0]


def test_knn_matches_slow_reference_and_is_chunk_invariant():
    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(70, 5, generator=g), torch.randn(23, 5, generator=g)
    labels = torch.randint(0, 6, (70,), generator=g)
    k, t = 7, 0.5
    tn, qn = train / train.norm(dim=1, keepdim=True), test / test.norm(dim=1, keepdim=True)
    expected = []
    for q in qn:
        sims = [(float(q @ r), int(c)) for r, c in zip(tn, labels, strict=True)]
        sims.sort(key=lambda s: -s[0])
        score = np.zeros(6)
        for s, c in sims[:k]:
            score[c] += np.exp(s / t)
        expected.append(int(score.argmax()))
    for chunk in (1, 5, 1024):
        got = knn_predict(train, labels, test, k=k, temperature=t, chunk_size=chunk)
        assert got.tolist() == expected


def test_knn_rejects_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(x, torch.zeros(4, dtype=torch.long), x, temperature=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        knn_predict(x, torch.tensor([0, 1, -1, 0]), x)


# ---------------------------------------------------------------- clustering


def test_cluster_accuracy_permuted_labels_is_one():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    assert cluster_accuracy(y, np.array([5, 5, 9, 9, 3, 3, 3])) == 1.0


def test_cluster_accuracy_with_more_and_fewer_clusters_than_classes():
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    # 4 clusters, 3 classes. Counts: c0={0:2}, c1={0:1,1:2}, c2={2:1}, c3={2:2}; the best
    # one-to-one map is c0->0, c1->1, c3->2 (2+2+2 of 8); c2 stays unmatched.
    y_pred = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(6 / 8)
    # 1 cluster, 3 classes: only the largest class can be matched.
    assert cluster_accuracy(y_true, np.zeros(8, dtype=int)) == pytest.approx(3 / 8)


def test_clustering_scores_match_sklearn():
    rng = np.random.default_rng(3)
    y_true, y_pred = rng.integers(0, 4, 50), rng.integers(0, 6, 50)
    scores = clustering_scores(y_true, y_pred)
    assert set(scores) == {"nmi", "ari", "acc", "fm"}
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(y_true, y_pred))
    assert scores["fm"] == pytest.approx(fowlkes_mallows_score(y_true, y_pred))
    assert scores["ari"] == pytest.approx(adjusted_rand_score(y_true, y_pred))
    assert scores["acc"] == pytest.approx(cluster_accuracy(y_true, y_pred))


def test_kmeans_recovers_blobs():
    x, y = blobs(40, 6, 12, seed=4, spread=0.08)
    pred = kmeans_labels(x.numpy() * 7.0, k=6, seed=0)  # scale: it must normalise itself
    assert pred.shape == (240,) and pred.dtype == np.int64
    assert normalized_mutual_info_score(y.numpy(), pred) > 0.95
    with pytest.raises(ValueError, match="at least k"):
        kmeans_labels(x.numpy()[:3], k=6)


# ---------------------------------------------------------------- features


def test_dedup_by_index_handles_sampler_padding():
    # Two "shards" padded by repeating indices 3 and 0; index 4 never seen.
    idx = torch.tensor([3, 0, 1, 2, 3, 0])
    feats = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    feats[4] += 100  # a differing duplicate: the first occurrence must win
    out, present = dedup_by_index(feats, idx, num_samples=5)
    assert present.tolist() == [True, True, True, True, False]
    assert torch.equal(out[:4], feats[[1, 2, 3, 0]])
    assert torch.equal(out[4], torch.zeros(2))
    with pytest.raises(ValueError, match="indices must lie"):
        dedup_by_index(feats, idx, num_samples=3)


def test_extract_features_order_normalisation_and_dedup():
    x = torch.randn(10, 3, 2, 2)
    loader = DataLoader(IndexedImages(x), batch_size=4, shuffle=True)
    embed = lambda b: 3.0 * b.flatten(1)
    feats, idx = extract_features(embed, loader)
    assert feats.dtype == torch.float32 and idx.dtype == torch.int64 and feats.shape == (10, 12)
    assert sorted(idx.tolist()) == list(range(10))
    assert torch.allclose(feats.norm(dim=1), torch.ones(10))
    raw, raw_idx = extract_features(embed, loader, normalize=False)
    ordered, present = dedup_by_index(raw, raw_idx, 10)
    assert present.all() and torch.allclose(ordered, 3.0 * x.flatten(1))


def test_eval_mode_freezes_batchnorm_and_restores_flags():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.BatchNorm1d(8))
    model.train()
    model[3].eval()  # a deliberately frozen BN must stay frozen afterwards
    for _ in range(3):  # give BN non-trivial running statistics
        model(torch.randn(16, 4) + 2.0)
    stats = model[1].running_mean.clone()
    x = torch.randn(6, 4)
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        together = model(torch.cat([x, 10 * torch.randn(6, 4)]))[:6]
        alone = model(x)
        assert torch.allclose(together, alone, atol=1e-6)  # batch-composition independent
    assert torch.equal(model[1].running_mean, stats)
    assert [m.training for m in model] == [True, True, True, False] and model.training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training and model[1].training  # restored on error too


# ---------------------------------------------------------------- hierarchy


LABELS = np.stack([np.repeat(np.arange(6), 10), np.repeat(np.arange(6) // 3, 10)], axis=1)


def test_hierarchy_consistency_perfect_tree():
    fine_to_cluster = np.array([4, 2, 0, 5, 1, 3])  # arbitrary cluster ids
    coarse_to_cluster = np.array([1, 0])
    parents = [np.zeros(6, dtype=int), np.zeros(2, dtype=int)]  # + a dummy top-level map
    parents[0][fine_to_cluster] = coarse_to_cluster[np.arange(6) // 3]
    assign = [fine_to_cluster[LABELS[:, 0]], coarse_to_cluster[LABELS[:, 1]]]
    out = hierarchy_consistency([torch.tensor(p) for p in parents], assign, LABELS)
    for key in ("purity/l0_vs_y0", "purity/l0_vs_y1", "purity/l1_vs_y1"):
        assert out[key] == 1.0
    assert out["purity/l1_vs_y0"] == pytest.approx(1 / 3)  # a coarse cluster holds 3 fines
    assert out["path_consistency"] == 1.0 and out["path_accuracy"] == 1.0


def test_hierarchy_consistency_shuffled_tree_is_lower():
    # Fine clusters = fine labels, but the parent map mixes super-classes:
    # {0, 2, 4} -> A, {1, 3, 5} -> B. A's majority coarse label is 0, B's is 1, so the mapped
    # paths of fine classes 1 and 4 contradict the true tree: consistency 4/6.
    parents = [np.array([0, 1, 0, 1, 0, 1])]
    assign = [LABELS[:, 0], parents[0][LABELS[:, 0]]]
    out = hierarchy_consistency(parents, assign, LABELS)
    assert out["purity/l0_vs_y0"] == 1.0
    assert out["purity/l1_vs_y1"] == pytest.approx(2 / 3)
    assert out["path_consistency"] == pytest.approx(4 / 6)
    assert out["path_accuracy"] == pytest.approx(4 / 6)
    assert hierarchy_consistency(parents, assign, LABELS[:, :0]) == {}


# ---------------------------------------------------------------- report


class Exploding:
    def __iter__(self):
        raise AssertionError("the loader must not be read")



def fake_hierarchical_images(n_per: int, seed: int):
    """4 fine classes in 2 super-classes; fine centres sit near their super-class centre."""
    rng = np.random.default_rng(seed)
    coarse_centres = 3.0 * rng.normal(size=(2, 48))
    fine_centres = coarse_centres[[0, 0, 1, 1]] + 1.0 * rng.normal(size=(4, 48))
    fine = np.repeat(np.arange(4), n_per)
    x = fine_centres[fine] + 0.2 * rng.normal(size=(fine.size, 48))
    labels = np.stack([fine, fine // 2], axis=1)
    return torch.tensor(x, dtype=torch.float32).reshape(-1, 3, 4, 4), labels


def test_evaluate_end_to_end_two_levels():
    torch.manual_seed(0)
    x_tr, y_tr = fake_hierarchical_images(30, seed=5)
    x_te, y_te = fake_hierarchical_images(15, seed=5)
    # Shuffled loaders: metrics are only right if features are re-aligned by index.
    train = DataLoader(IndexedImages(x_tr), batch_size=16, shuffle=True)
    test = DataLoader(IndexedImages(x_te), batch_size=16, shuffle=True)
    embed = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(48)).train()
    out = evaluate(embed, train, test, y_tr, y_te, ["fine", "coarse"], k=10, seed=0)
    expected = {
        f"{m}/{lvl}" for m in ("knn_acc", "nmi", "ari", "acc", "fm")
        for lvl in ("fine", "coarse")
    }
    assert set(out) == expected
    assert all(isinstance(v, float) for v in out.values())
    for lvl in ("fine", "coarse"):
        assert out[f"knn_acc/{lvl}"] > 0.95
        assert out[f"nmi/{lvl}"] > 0.9 and out[f"acc/{lvl}"] > 0.9 and out[f"ari/{lvl}"] > 0.8
    assert embed.training and embed[1].training  # evaluation restored train mode
    assert int(embed[1].num_batches_tracked) == 0  # and BN stats were not touched


def test_evaluate_unlabeled_and_mismatched_levels():
    empty = np.zeros((5, 0), dtype=np.int64)
    assert evaluate(lambda b: b, Exploding(), Exploding(), empty, empty, []) == {}
    assert evaluate(lambda b: b, Exploding(), Exploding(), empty, empty, ["fine"]) == {}
    y = np.zeros((5, 2), dtype=np.int64)
    with pytest.raises(ConfigError, match="level_names"):
        evaluate(lambda b: b, Exploding(), Exploding(), y, y, ["fine"])


# ---------------------------------------------------------------- protocols


class CountingLoader:
    """A loader over (image, index) batches that counts how often it is iterated."""

    def __init__(self, images: torch.Tensor, batch_size: int = 16):
        self.loader = DataLoader(IndexedImages(images), batch_size=batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(0))
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.loader)


def test_default_protocols_give_todays_figures_and_extract_features_once():
    x_tr, y_tr = fake_hierarchical_images(20, seed=6)
    x_te, y_te = fake_hierarchical_images(10, seed=7)
    y_tr[:5, 0] = -1  # unlabeled at the fine level: left out of that level only
    train, test = CountingLoader(x_tr), CountingLoader(x_te)
    embed = nn.Flatten()
    cfg = load_config(None, {"eval.params.knn.k": 7}).eval
    out = run_evaluation(embed, cfg, train, test, y_tr, y_te, ["fine", "coarse"], seed=3)
    assert train.passes == 1 and test.passes == 1  # shared by knn and clustering
    # The same figures computed directly from the building blocks, as evaluate() did before
    # protocols existed.
    f_tr = torch.nn.functional.normalize(x_tr.flatten(1), dim=1)
    f_te = torch.nn.functional.normalize(x_te.flatten(1), dim=1)
    expected = {}
    for j, name in enumerate(["fine", "coarse"]):
        keep = y_tr[:, j] >= 0
        expected[f"knn_acc/{name}"] = knn_accuracy(f_tr[torch.from_numpy(keep)], y_tr[keep, j],
                                                   f_te, y_te[:, j], k=7, temperature=0.07)
        pred = kmeans_labels(f_te.numpy(), k=np.unique(y_te[:, j]).size, seed=3)
        expected.update({f"{m}/{name}": v for m, v in clustering_scores(y_te[:, j], pred).items()})
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-9), key
    # The old fixed-protocol entry point gives the same keys and values.
    old = evaluate(embed, train, test, y_tr, y_te, ["fine", "coarse"], k=7, seed=3)
    assert old == pytest.approx(out, abs=1e-9)


def perfect_hierarchy() -> PrototypeHierarchy:
    fine = torch.tensor(LABELS[:, 0])
    parents = torch.tensor([0, 0, 0, 1, 1, 1])
    return PrototypeHierarchy(
        version=1, centroids=(torch.eye(6), torch.eye(6)[:2]), parents=(parents,),
        assignments=(fine, parents[fine]), densities=(torch.ones(6), torch.ones(2)))


def test_consistency_protocol_scores_the_hierarchy_without_features():
    h = perfect_hierarchy()
    inputs = EvalInputs(LABELS, LABELS, ("fine", "coarse"), hierarchy=h)
    out = run_protocols(["consistency"], inputs)  # no feature source: must not need one
    direct = hierarchy_consistency(h.parents, h.assignments, LABELS)
    assert out == {f"hierarchy/{k}": v for k, v in direct.items()}
    assert out["hierarchy/path_accuracy"] == 1.0
    cfg = load_config(None, {"eval.protocols": ["consistency"]}).eval
    got = run_evaluation(lambda b: b, cfg, Exploding(), Exploding(), LABELS, LABELS,
                         ["fine", "coarse"], hierarchy=h)
    assert got == out
    # Without a hierarchy, or without labels, it reports nothing.
    assert run_protocols(["consistency"], EvalInputs(LABELS, LABELS, ("fine", "coarse"))) == {}
    empty = LABELS[:, :0]
    assert run_protocols(["consistency"], EvalInputs(empty, empty, (), hierarchy=h)) == {}


def test_run_protocols_refuses_two_protocols_writing_one_key():
    inputs = EvalInputs(LABELS, LABELS, ("fine", "coarse"), hierarchy=perfect_hierarchy())
    with pytest.raises(ValueError, match="'consistency' writes 'hierarchy/.*an earlier protocol"):
        run_protocols(["consistency", "consistency"], inputs)


def test_metric_prefixes_come_from_the_protocols():
    assert level_metric_prefixes()[:5] == ("knn_acc", "nmi", "ari", "acc", "fm")
    assert level_metric_prefixes(["clustering"])[:4] == ("nmi", "ari", "acc", "fm")
    assert level_metric_prefixes(["consistency"]) == ()
    assert metric_prefixes(["knn", "consistency"]) == ("knn_acc", "hierarchy")
    with pytest.raises(ConfigError, match="eval.protocols must be one of"):
        level_metric_prefixes(["nope"])


def test_protocol_subset_only_runs_those():
    x, y = fake_hierarchical_images(10, seed=8)
    cfg = load_config(None, {"eval.protocols": ["knn"]}).eval
    out = run_evaluation(nn.Flatten(), cfg, CountingLoader(x), CountingLoader(x), y, y,
                         ["fine", "coarse"])
    assert set(out) == {"knn_acc/fine", "knn_acc/coarse"}


# ---------------------------------------------------------------- the eval: section


def test_eval_section_defaults_and_protocol_params():
    cfg = load_config(None).eval
    assert cfg.protocols == ("knn", "clustering", "consistency")
    assert cfg.params["knn"].k == 20 and cfg.params["knn"].temperature == 0.07
    assert cfg.params["clustering"].nredo == 3
    cfg = load_config(None, {"eval.params.knn.k": 5, "eval.protocols": ["knn"]}).eval
    assert cfg.params["knn"].k == 5 and set(cfg.params) == {"knn"}
    saved = load_config(None, {"eval.params.knn.temperature": 0.2}).to_dict()
    assert saved["eval"]["params"]["knn"] == {"k": 20, "temperature": 0.2}
    assert load_config(saved) == load_config(None, {"eval.params.knn.temperature": 0.2})


@pytest.mark.parametrize("overrides, message", [
    ({"eval.protocols": ["knn", "nope"]}, "eval.protocols must be one of .*got 'nope'"),
    ({"eval.protocols": ["knn", "knn"]}, "eval.protocols lists a protocol twice"),
    ({"eval.params.knn.kk": 3}, "unknown key eval.params.knn.kk; valid keys: k, temperature"),
    ({"eval.params.knn.k": 0}, "eval.params.knn.k must be > 0, got 0"),
    ({"eval.params.knn.k": "many"}, "eval.params.knn.k must be an integer"),
    ({"eval.params.nope": {}}, "unknown key eval.params.nope; registered eval.protocols"),
    ({"eval.params.consistency.x": 1}, "unknown key eval.params.consistency.x"),
    ({"eval.protocols": ["clustering"], "eval.params.knn.k": 3},
     "eval.params.knn is set but 'knn' is not in eval.protocols"),
    ({"eval.knn_k": 3, "eval.params.knn.k": 4}, "eval.knn_k and eval.params.knn.k are both set"),
])
def test_eval_section_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_old_knn_keys_move_to_the_knn_protocol(caplog):
    with caplog.at_level(logging.WARNING, logger="hirl_ray"):
        cfg = load_config(None, {"eval.knn_k": 7, "eval.knn_temperature": 0.5}).eval
    assert cfg.params["knn"].k == 7 and cfg.params["knn"].temperature == 0.5
    assert (cfg.params["knn"].k, cfg.params["knn"].temperature) == (7, 0.5)
    assert "eval.knn_k is deprecated; use eval.params.knn.k" in caplog.text
    assert "knn" in PROTOCOLS
