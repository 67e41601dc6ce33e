"""Numpy drawing primitives shared by the suite's task generators.

Every shape is a signed distance (positive inside) in *image units*: the image spans [0, 1) on both axes, so a
generator describes geometry once and renders at any ``size``. Coverage is the signed distance turned into a
one-pixel soft edge, which keeps small shapes anti-aliased at 32x32 instead of jagged, so a probe cannot key on
pixel-exact edges. Images are float32 (H, W, 3) in [0, 1] until :func:`to_uint8`.

Small shapes are drawn through :func:`stamp`, which evaluates them only on the pixels of their bounding box: at
32x32 most of the cost is per-pixel work, and a typical object covers a tenth of the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np

Array = np.ndarray
Shape = Callable[..., Array]

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@lru_cache(maxsize=16)
def grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates as a (size, 1) column ``y`` and a (1, size) row ``x``; they broadcast to the image.

    Cached and shared: callers must not write into them.
    """
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[:, None], c[None, :]


def coverage(sd: Array, size: int) -> Array:
    """Signed distance to a [0, 1] alpha with a one-pixel ramp at the edge."""
    return np.clip(sd * size + 0.5, 0.0, 1.0)


def rotate(y: Array, x: Array, cy: float, cx: float, angle: float) -> tuple[Array, Array]:
    """Coordinates relative to (cy, cx), rotated by ``-angle`` so a shape drawn along ``u`` points along ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    dy, dx = y - cy, x - cx
    return dx * c + dy * s, dy * c - dx * s


def disc(y: Array, x: Array, cy: float, cx: float, r: float) -> Array:
    """Disc of radius ``r``: the exact signed distance."""
    return r - np.sqrt((y - cy) ** 2 + (x - cx) ** 2)


def box(y: Array, x: Array, cy: float, cx: float, half_u: float, half_v: float, angle: float = 0.0) -> Array:
    """Rotated rectangle with half-lengths ``half_u`` along ``angle`` and ``half_v`` across it."""
    u, v = rotate(y, x, cy, cx, angle)
    return np.minimum(half_u - np.abs(u), half_v - np.abs(v))


def ellipse(y: Array, x: Array, cy: float, cx: float, a: float, b: float, angle: float = 0.0) -> Array:
    """Approximate signed distance of a rotated ellipse (exact on the axes, good enough for a soft edge)."""
    u, v = rotate(y, x, cy, cx, angle)
    return (1.0 - np.sqrt((u / a) ** 2 + (v / b) ** 2)) * min(a, b)


def polygon(y: Array, x: Array, cy: float, cx: float, r: float, sides: int, angle: float = 0.0) -> Array:
    """Regular polygon of circumradius ``r``: apothem minus the projection on the nearest edge normal."""
    dy, dx = y - cy, x - cx
    sector = 2 * math.pi / sides
    offset = (np.arctan2(dy, dx) - angle) % sector - sector / 2
    return r * math.cos(sector / 2) - np.sqrt(dy**2 + dx**2) * np.cos(offset)


def blob(y: Array, x: Array, cy: float, cx: float, r: float, lobes: int, depth: float, phase: float) -> Array:
    """Disc whose radius is modulated by ``lobes`` bumps of relative ``depth``: an irregular, lobed outline."""
    dy, dx = y - cy, x - cx
    radius = r * (1.0 + depth * np.sin(lobes * np.arctan2(dy, dx) + phase))
    return radius - np.sqrt(dy**2 + dx**2)


def random_shape(rng: np.random.Generator, r: float) -> tuple[Shape, tuple[float, ...]]:
    """A random compact shape (disc, triangle, square or hexagon) of radius about ``r``: a nuisance factor.

    Returns the shape function and its parameters after the centre, ready for :func:`stamp`.
    """
    kind = int(rng.integers(4))
    if kind == 0:
        return disc, (r * 0.9,)
    return polygon, (r, (3, 4, 6)[kind - 1], rng.uniform(0, 2 * math.pi))


def _span(centre: float, extent: float, size: int) -> slice:
    return slice(max(0, math.floor((centre - extent) * size) - 1), min(size, math.ceil((centre + extent) * size) + 1))


def stamp(
    image: Array,
    rgb: Array | float,
    extent: float,
    shape: Shape,
    cy: float,
    cx: float,
    *params: float,
    opacity: float = 1.0,
) -> None:
    """Paint ``shape(y, x, cy, cx, *params)`` in ``rgb``, evaluating it only within ``extent`` of its centre.

    ``extent`` must bound the shape (half its bounding box, in image units); the margin covers the soft edge.
    """
    size = image.shape[0]
    y, x = grid(size)
    rows, cols = _span(cy, extent, size), _span(cx, extent, size)
    if rows.start >= rows.stop or cols.start >= cols.stop:
        return
    alpha = coverage(shape(y[rows], x[:, cols], cy, cx, *params), size)
    paint(image[rows, cols], alpha * opacity if opacity != 1.0 else alpha, rgb)


def bilinear(table: Array, fy: Array, fx: Array) -> Array:
    """Sample a 2-D ``table`` at fractional indices, clamped to its border."""
    h, w = table.shape
    fy, fx = np.broadcast_arrays(np.clip(fy, 0, h - 1), np.clip(fx, 0, w - 1))
    y0 = np.minimum(fy.astype(np.intp), h - 2)
    x0 = np.minimum(fx.astype(np.intp), w - 2)
    ty, tx = fy - y0, fx - x0
    top = table[y0, x0] * (1 - tx) + table[y0, x0 + 1] * tx
    bottom = table[y0 + 1, x0] * (1 - tx) + table[y0 + 1, x0 + 1] * tx
    return (top * (1 - ty) + bottom * ty).astype(np.float32)


@lru_cache(maxsize=64)
def _upsampler(size: int, cells: int) -> Array:
    """(size, cells + 1) bilinear interpolation weights from a lattice to pixel centres (cached: reused per image)."""
    pos = grid(size)[0][:, 0] * cells
    lattice = np.arange(cells + 1, dtype=np.float32)
    return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - lattice[None, :])).astype(np.float32)


def smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 0) -> Array:
    """Value noise in [0, 1]: a random (cells + 1)^2 lattice upsampled bilinearly, for blotches and lighting.

    The upsampling is two small matrix products (separable bilinear weights), several times faster than gathering.
    """
    weights = _upsampler(size, cells)
    lattice = rng.random((max(channels, 1), cells + 1, cells + 1), dtype=np.float32)
    field = weights @ lattice @ weights.T
    return field.transpose(1, 2, 0) if channels else field[0]


def colour(rng: np.random.Generator) -> Array:
    """A uniformly random RGB colour: hue and brightness are nuisances in every task."""
    return rng.random(3, dtype=np.float32)


def contrasting(rng: np.random.Generator, reference: Array, min_diff: float = 0.3, brighter: float = 0.5) -> Array:
    """A random colour whose luminance is at least ``min_diff`` above (probability ``brighter``) or below ``reference``.

    Polarity is a nuisance with a tunable bias: VTAB's structured sets mostly show bright objects on dark ground,
    so a probe can find them, yet a minority of inverted images keeps summed intensity from being the whole story.
    Candidates are drawn in one batch and the first that qualifies wins (a fixed draw count keeps later draws
    aligned); when none does, the reference's opposite extreme is used.
    """
    sign = 1.0 if rng.random() < brighter else -1.0
    ref = float(reference @ _LUMA)
    candidates = rng.random((16, 3), dtype=np.float32)
    ok = sign * (candidates @ _LUMA - ref) >= min_diff
    if ok.any():
        return candidates[int(np.argmax(ok))]
    return np.full(3, 1.0 if ref < 0.5 else 0.0, dtype=np.float32)


def dark(rng: np.random.Generator, level: float = 0.6) -> Array:
    """A random colour scaled into [0, ``level``]: a background that bright objects stand out from."""
    return colour(rng) * level


def background(rng: np.random.Generator, size: int, base: Array, spread: float = 0.25) -> Array:
    """``base`` colour with a low-frequency colour drift across the image (lighting, vignetting)."""
    drift = (smooth_noise(rng, size, int(rng.integers(1, 4)), 3) - 0.5) * spread
    return np.clip(base + drift, 0.0, 1.0)


def paint(image: Array, alpha: Array, rgb: Array | float) -> None:
    """Alpha-blend a flat colour into ``image`` (or a view of it) in place."""
    image += alpha[..., None] * (np.asarray(rgb, dtype=np.float32) - image)


def mix(low: Array, high: Array, pattern: Array) -> Array:
    """Per-pixel blend of two colours by a [0, 1] pattern."""
    return low + pattern[..., None] * (high - low)


def clutter(rng: np.random.Generator, image: Array, count: int, opacity: float = 0.35) -> None:
    """Thin, faint line segments: nuisance structure that is not an object (so it never changes a label)."""
    size = image.shape[0]
    for _ in range(count):
        cy, cx, half = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.25)
        params = (half, 0.35 / size, rng.uniform(0, math.pi))
        stamp(image, colour(rng), half, box, cy, cx, *params, opacity=rng.uniform(0.3, 1.0) * opacity)


def to_uint8(rng: np.random.Generator, image: Array, noise: float = 0.03) -> Array:
    """Add sensor noise and quantise; the noise hides exact colours so no two renders share pixel values."""
    noisy = image + rng.standard_normal(image.shape, dtype=np.float32) * noise
    return (np.clip(noisy, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
