"""The built-in synthetic dataset: a known 3-level label tree rendered with numpy.

HIRL (Xu et al., 2022) learns a hierarchy of prototypes by k-means on the features at each
level (Sec. 3.1); the dataset that checks it must have a hierarchy whose levels are ordered by
*visual salience*, or the coarsest prototypes split on whatever attribute dominates the
features instead of on the super-classes. Colour dominates CNN features even under colour
jitter, so:

* super-class (4) = hue family AND shape family together: red discs, lime squares, cyan
  triangles, violet crosses. Hue centres are 90 degrees apart (colour jitter's hue 0.1 shifts at
  most 36), and shape keeps the super-class visible in grayscale views (p=0.2).
* class (3 per super-class) = fill pattern: solid, striped (darker stripes), or hollow (rim).
* sub-class (2 per class) = object size: small or large (radius ratio ~1.3), the subtlest cue.

We measured the ordering: with a product design (super = shape, class = one of 3 hues shared
by all shapes) 4-means on SimCLR features had NMI ~0.0 with the super-classes (it split on
hue); with this design it is 0.85-0.99, and 10-NN accuracy is super > class > sub-class.

Nuisances per sample: position, exact size within the sub-class range, rotation (shape and
stripes together), hue wobble, saturation/value, a dark low-saturation background with a
random gradient, and pixel noise. Leaf id = ``superclass * 6 + pattern * 2 + size``; label
columns are (subclass, class, superclass).

Generation is vectorised over samples (no per-pixel Python loops; ~0.3 s for 3360 images at
32 px) and deterministic in ``(seed, split)``; train and test use different ``SeedSequence``
streams.
"""

from __future__ import annotations

import numpy as np
import torch

from hirl_ray.data.base import TensorHierDataset, label_parents

# Super-class k: shape SHAPES[k] in hue family HUES[k] (centres 90 degrees apart).
SHAPES = ("disc", "square", "triangle", "cross")
HUES = ("red", "lime", "cyan", "violet")
PATTERNS = ("solid", "striped", "hollow")  # class within a super-class
SIZES = ("small", "large")  # sub-class within a class
LEVEL_NAMES = ("subclass", "class", "superclass")
NUM_LEAVES = len(SHAPES) * len(PATTERNS) * len(SIZES)  # 24
_HUE_CENTRES = np.array([0.0, 90.0, 180.0, 270.0])
_RADIUS = {0: (0.19, 0.22), 1: (0.245, 0.28)}  # object radius / image side, per size
_PERIOD = 0.6  # stripe period in object radii: the stripes scale with the object
# Rim width of hollow objects in object radii, per shape: ~55% of the shape's inradius so
# every hollow shape keeps a visible hole.
_RIM = {"disc": 0.4, "square": 0.35, "triangle": 0.3, "cross": 0.25}
_SPLIT_STREAM = {"train": 0, "test": 1}
_PIXEL_BUDGET = 1 << 21  # pixels per rendering chunk: bounds memory at large image sizes


def leaf_labels(leaf: np.ndarray) -> np.ndarray:
    """(N,) leaf ids -> (N, 3) int64 labels (subclass, class, superclass)."""
    leaf = np.asarray(leaf, dtype=np.int64)
    per_super = len(PATTERNS) * len(SIZES)
    return np.stack([leaf, leaf // len(SIZES), leaf // per_super], axis=1)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; ``h`` in degrees, all (N,); returns (N, 3) in [0, 1]."""
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + h / 60.0) % 6.0
        out.append(v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return np.stack(out, axis=1)


def _disc(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.sqrt(u * u + v * v) - 1.0


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:  # half side sqrt(pi)/2: disc's area
    return np.maximum(np.abs(u), np.abs(v)) - 0.886


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:  # equilateral, inradius 0.675
    d = [
        u * np.float32(np.cos(a)) + v * np.float32(np.sin(a))
        for a in -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    ]
    return np.maximum(np.maximum(d[0], d[1]), d[2]) - np.float32(0.675)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:  # plus: bars 2.3 long, 1.0 wide
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - 1.15, av - 0.5), np.maximum(au - 0.5, av - 1.15))


# Signed distance (in object radii, negative inside) per shape family. Sizes give similar
# areas (~2.4-3.6 r^2) so area alone does not identify the shape.
SHAPE_SDF = {"disc": _disc, "square": _square, "triangle": _triangle, "cross": _cross}


def _render(leaf: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render (N,) leaf ids to (N, size, size, 3) float32 images in [0, 1]."""
    n = len(leaf)
    shape = leaf // (len(PATTERNS) * len(SIZES))
    pattern = (leaf // len(SIZES)) % len(PATTERNS)
    large = leaf % len(SIZES)

    # Per-sample parameters, drawn in a fixed order so the output depends only on rng.
    lo = np.where(large == 1, _RADIUS[1][0], _RADIUS[0][0])
    hi = np.where(large == 1, _RADIUS[1][1], _RADIUS[0][1])
    radius = size * rng.uniform(lo, hi)
    centre = size / 2 + rng.uniform(-0.08, 0.08, size=(2, n)) * size
    theta = rng.uniform(0.0, 2 * np.pi, size=n)
    hue = _HUE_CENTRES[shape] + rng.uniform(-6.0, 6.0, size=n)
    fg = _hsv_to_rgb(hue, rng.uniform(0.6, 0.9, n), rng.uniform(0.8, 1.0, n))
    bg = _hsv_to_rgb(rng.uniform(0, 360, n), rng.uniform(0.0, 0.3, n), rng.uniform(0.05, 0.3, n))
    grad = rng.uniform(-0.12, 0.12, size=(2, n))
    phase = rng.uniform(0.0, 2 * np.pi, size=n)
    noise = rng.standard_normal(size=(n, size, size, 3), dtype=np.float32) * np.float32(0.03)
    # float32 from here on: memory traffic dominates generation time.
    centre, radius, theta, fg, bg, grad, phase = (
        x.astype(np.float32) for x in (centre, radius, theta, fg, bg, grad, phase)
    )

    g = np.arange(size, dtype=np.float32) + 0.5
    dx = g[None, None, :] - centre[0, :, None, None]  # (N, 1, S): x runs along columns
    dy = g[None, :, None] - centre[1, :, None, None]  # (N, S, 1)
    cos, sin, r = (x[:, None, None] for x in (np.cos(theta), np.sin(theta), radius))
    u = (cos * dx + sin * dy) / r  # object frame, in radii: shape and pattern rotate together
    v = (-sin * dx + cos * dy) / r
    sdf = np.empty((n, size, size), dtype=np.float32)
    for k, name in enumerate(SHAPES):  # one vectorised pass per shape family
        idx = np.flatnonzero(shape == k)
        if idx.size:
            sdf[idx] = SHAPE_SDF[name](u[idx], v[idx])
    # Anti-aliased coverage: 1 inside, 0 outside, linear across the one-pixel edge. A hollow
    # object keeps only a rim _RIM radii wide (its inside shows the background).
    alpha = np.clip(0.5 - sdf * r, 0.0, 1.0)
    hollow = (pattern == 2)[:, None, None]
    rim = np.array([_RIM[name] for name in SHAPES], dtype=np.float32)[shape][:, None, None]
    alpha = alpha - hollow * np.clip(0.5 - (sdf + rim) * r, 0.0, 1.0)
    alpha = alpha[..., None]

    # Stripes in a darker shade of the object colour, so the hue (super-class cue) stays
    # dominant; soft edges avoid aliasing at 32 px.
    wave = np.sin(np.float32(2 * np.pi / _PERIOD) * u + phase[:, None, None])
    mark = np.clip(0.5 + 1.5 * wave, 0.0, 1.0) * (pattern == 1)[:, None, None]
    fill = fg[:, None, None, :] * (1 - 0.6 * mark[..., None])
    pos = g / size - 0.5  # background: random linear gradient over a dark base colour
    ramp = grad[0, :, None, None] * pos[None, None, :] + grad[1, :, None, None] * pos[None, :, None]
    back = bg[:, None, None, :] + ramp[..., None]
    img = back * (1 - alpha) + fill * alpha + noise
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def generate(
    n_per_leaf: int, image_size: int = 32, seed: int = 0, split: str = "train"
) -> tuple[torch.Tensor, np.ndarray]:
    """Generate the synthetic set.

    Args:
        n_per_leaf: images per leaf (sub-)class; the set has ``24 * n_per_leaf`` images.
        image_size: side length in pixels.
        seed: base seed; ``split`` selects an independent stream.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(images, labels)``: uint8 (N, 3, S, S) tensor and (N, 3) int64 labels.
    """
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_STREAM[split]]))
    leaf = rng.permutation(np.repeat(np.arange(NUM_LEAVES), n_per_leaf))
    chunk = max(1, _PIXEL_BUDGET // (image_size * image_size))
    out = np.empty((len(leaf), 3, image_size, image_size), dtype=np.uint8)
    for start in range(0, len(leaf), chunk):
        img = _render(leaf[start : start + chunk], image_size, rng)
        out[start : start + chunk] = np.rint(img * 255).astype(np.uint8).transpose(0, 3, 1, 2)
    return torch.from_numpy(out), leaf_labels(leaf)


class SyntheticHierarchy(TensorHierDataset):
    """The built-in 4 -> 12 -> 24 hierarchical dataset (see module docstring).

    Args:
        split: ``"train"`` or ``"test"``.
        n_per_leaf: images per leaf class.
        image_size: side length in pixels.
        seed: generation seed.
    """

    shapes = SHAPES
    hues = HUES
    patterns = PATTERNS
    sizes = SIZES
    # parents[0][subclass] = class, parents[1][class] = superclass (fixed by construction).
    label_tree: tuple[np.ndarray, ...] = label_parents(leaf_labels(np.arange(NUM_LEAVES)))

    def __init__(
        self, split: str = "train", n_per_leaf: int = 100, image_size: int = 32, seed: int = 0
    ) -> None:
        images, labels = generate(n_per_leaf, image_size, seed, split)
        super().__init__(images, labels, LEVEL_NAMES)
        self.split = split

    @staticmethod
    def leaf_name(leaf: int) -> str:
        """Human-readable name of a leaf id, e.g. ``"cyan triangle/striped/small"``."""
        s, rest = divmod(int(leaf), len(PATTERNS) * len(SIZES))
        p, z = divmod(rest, len(SIZES))
        return f"{HUES[s]} {SHAPES[s]}/{PATTERNS[p]}/{SIZES[z]}"
