"""Rebuild memory estimate: a warning before training, not an OOM after hours."""

from __future__ import annotations

from hirl_ray.hierarchy.memory import rebuild_bytes, rebuild_memory_warning


def test_estimate_grows_with_samples_dims_and_clusters():
    base = rebuild_bytes(10_000, 128, [100, 10])
    assert rebuild_bytes(20_000, 128, [100, 10]) > 1.9 * base * 0.99
    assert rebuild_bytes(10_000, 256, [100, 10]) > base
    assert rebuild_bytes(10_000, 128, [5000, 10]) > base
    # ImageNet at 2048-d: the feature matrix alone is ~10 GB in float32.
    assert rebuild_bytes(1_281_167, 2048, [30000, 10000, 1000]) > 10 * 2**30


def test_warning_names_the_key_and_fix_only_when_it_will_not_fit():
    assert rebuild_memory_warning(10_000, 128, [100, 10], available=64 * 2**30) is None
    text = rebuild_memory_warning(1_281_167, 2048, [30000, 10000, 1000], available=8 * 2**30)
    assert text is not None and "hirl.num_clusters" in text and "actor" in text
    assert "\n" not in text
