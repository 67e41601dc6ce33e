"""Formula-driven pretraining images: FractalDB-style iterated-function-system (IFS) fractal categories.

Every category is one random IFS (2 to 4 contractive affine maps); its instances are the category's attractor
rendered with a small jitter of the maps, a random colouring, scale, position and rotation, on a random background.
Nothing is downloaded or stored: a category set and every batch follow from a seed, so a pretraining run can be
remade (and resumed) exactly. The labels are fractal categories only, never digits, counts, positions, orientations,
sizes or texture classes, so a downstream suite built from those stays out of the pretraining labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FractalCategories", "make_categories", "render_batch", "batch_rng"]

_TRAIN_STREAM = 0
_HELDOUT_STREAM = 1
_CATEGORY_STREAM = 2


@dataclass(frozen=True)
class FractalCategories:
    """A fixed set of IFS categories.

    Attributes:
        maps: ``(C, K, 2, 3)`` affine maps ``[A | b]``; a category with fewer than K maps pads with maps of
            probability zero.
        probs: ``(C, K)`` map probabilities (proportional to ``|det A|``, as in the usual chaos game, so that the
            attractor is filled evenly).
        seed: the seed the set was drawn from.
    """

    maps: np.ndarray
    probs: np.ndarray
    seed: int

    @property
    def num_classes(self) -> int:
        return len(self.maps)


def batch_rng(seed: int, index: int, *, heldout: bool = False) -> np.random.Generator:
    """The generator of batch ``index``: training and held-out batches come from disjoint streams of one seed."""
    return np.random.default_rng([seed, _HELDOUT_STREAM if heldout else _TRAIN_STREAM, index])


def _random_ifs(rng: np.random.Generator, max_maps: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one IFS with contractive maps (largest singular value <= 0.9, so the chaos game converges)."""
    count = int(rng.integers(2, max_maps + 1))
    maps = np.zeros((max_maps, 2, 3))
    maps[:count] = rng.uniform(-1.0, 1.0, size=(count, 2, 3))
    for k in range(count):
        top = np.linalg.svd(maps[k, :, :2], compute_uv=False)[0]
        if top > 0.9:
            maps[k, :, :2] *= rng.uniform(0.5, 0.9) / top
    dets = np.abs(np.linalg.det(maps[:count, :, :2]))
    probs = np.zeros(max_maps)
    probs[:count] = dets + 0.02 * dets.sum() + 1e-6
    return maps, probs / probs.sum()


def _occupancy(maps: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """Fraction of a 32x32 grid that the attractor covers when scaled to fit, and its bounding-box aspect ratio."""
    points, _ = _chaos_game(maps[None], probs[None], rng, chains=256, steps=16)
    pts = points[0]
    low, high = pts.min(0), pts.max(0)
    extent = np.maximum(high - low, 1e-9)
    cells = np.floor((pts - low) / extent.max() * 31.999).astype(int)
    covered = len(np.unique(cells[:, 0] * 32 + cells[:, 1]))
    return covered / 1024.0, float(extent.min() / extent.max())


def make_categories(num_classes: int, seed: int, *, max_maps: int = 4) -> FractalCategories:
    """Draw ``num_classes`` IFS categories, rejecting degenerate ones (dots, lines, blobs that fill the square).

    The rejection keeps categories visually distinct and rich in thin structure, which is what makes the
    classification task teach shape features rather than colour statistics.
    """
    rng = np.random.default_rng([seed, _CATEGORY_STREAM])
    maps, probs = [], []
    while len(maps) < num_classes:
        m, p = _random_ifs(rng, max_maps)
        fill, aspect = _occupancy(m, p, rng)
        if 0.08 <= fill <= 0.6 and aspect >= 0.25:
            maps.append(m)
            probs.append(p)
    return FractalCategories(np.stack(maps), np.stack(probs), seed)


def _chaos_game(
    maps: np.ndarray, probs: np.ndarray, rng: np.random.Generator, *, chains: int, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Run the chaos game for B IFSs at once, ``chains`` parallel walkers each.

    Walkers start on the fixed point of a map, which lies on the attractor, so no burn-in is needed. Returns the
    ``(B, chains * steps, 2)`` points and the index of the map that produced each point (used for colouring).
    """
    batch, k = probs.shape
    linear, shift = maps[..., :2], maps[..., 2]
    first = np.linalg.solve(np.eye(2) - linear[:, 0], shift[:, 0, :, None])[
        ..., 0
    ]  # fixed point of map 0 (always present)
    x = np.repeat(first[:, None, :], chains, axis=1)
    cum = np.cumsum(probs, axis=1)
    cum[:, -1] = 1.0 + 1e-9
    offsets = (np.arange(batch) * k)[:, None]
    flat_linear, flat_shift = linear.reshape(-1, 2, 2), shift.reshape(-1, 2)
    points = np.empty((batch, steps, chains, 2))
    which = np.empty((batch, steps, chains), dtype=np.int64)
    for t in range(steps):
        u = rng.random((batch, chains))
        idx = (u[..., None] >= cum[:, None, :]).sum(-1)
        sel = offsets + idx
        x = np.einsum("bcij,bcj->bci", flat_linear[sel], x) + flat_shift[sel]
        points[:, t] = x
        which[:, t] = idx
    return points.reshape(batch, -1, 2), which.reshape(batch, -1)


def _hsv_colours(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random saturated-ish colours in [0, 1] (HSV sampling gives more distinct hues than uniform RGB)."""
    h = rng.random(shape) * 6.0
    s = rng.uniform(0.3, 1.0, shape)
    v = rng.uniform(0.4, 1.0, shape)
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = np.floor(h).astype(int) % 6
    r = np.choose(sector, [v, q, p, p, t, v])
    g = np.choose(sector, [t, v, v, q, p, p])
    b = np.choose(sector, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _backgrounds(rng: np.random.Generator, batch: int, size: int) -> np.ndarray:
    """Random backgrounds: flat colour (half), linear gradient or smooth colour noise (a quarter each)."""
    kind = rng.choice(3, size=batch, p=[0.5, 0.25, 0.25])
    a = rng.random((batch, 1, 1, 3))
    b = rng.random((batch, 1, 1, 3))
    out = np.broadcast_to(a, (batch, size, size, 3)).copy()
    grid = np.linspace(0.0, 1.0, size)
    angle = rng.uniform(0, 2 * np.pi, batch)
    ramp = np.cos(angle)[:, None, None] * grid[None, None, :] + np.sin(angle)[:, None, None] * grid[None, :, None]
    ramp = (ramp - ramp.min((1, 2), keepdims=True)) / np.maximum(np.ptp(ramp, axis=(1, 2), keepdims=True), 1e-9)
    gradient = a + (b - a) * ramp[..., None]
    out[kind == 1] = gradient[kind == 1]
    noisy = np.flatnonzero(kind == 2)
    if len(noisy):
        coarse = rng.random((len(noisy), 4, 4, 3))
        pos = np.linspace(0.0, 3.0, size)
        lo = np.minimum(pos.astype(int), 2)
        w = (pos - lo)[None, :, None, None]
        rows = coarse[:, lo] * (1 - w) + coarse[:, lo + 1] * w  # bilinear: smooth blobs, not a checkerboard
        w = w.reshape(1, 1, size, 1)
        smooth = rows[:, :, lo] * (1 - w) + rows[:, :, lo + 1] * w
        out[noisy] = 0.5 * a[noisy] + 0.5 * smooth
    return out


def render_batch(
    categories: FractalCategories,
    rng: np.random.Generator,
    batch: int,
    *,
    size: int = 32,
    chains: int = 128,
    steps: int = 20,
    jitter: float = 0.02,
    background: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``batch`` random instances of random categories.

    The attractor is drawn at twice the output resolution and averaged down, so thin branches come out as faint
    anti-aliased lines instead of disappearing. Colour is per map (or one colour for the whole fractal), which also
    shows the self-similar parts.

    Args:
        categories: the category set.
        rng: source of all randomness (``batch_rng`` gives a reproducible one per batch).
        batch: number of images.
        size: output side in pixels.
        chains: chaos-game walkers per image.
        steps: chaos-game steps per walker (points per image = ``chains * steps``).
        jitter: std of the per-instance noise on the maps' parameters (intra-category variation).
        background: float ``(batch, size, size, 3)`` images in [0, 1] to draw over; by default flat colours,
            gradients or smooth noise. Where the fractal's colours are too close to the background's mean, the
            default background is inverted, a given one is kept and the fractal's colours are inverted instead.

    Returns:
        ``(images, labels)``: uint8 ``(batch, size, size, 3)`` and int64 ``(batch,)`` category indices.
    """
    labels = rng.integers(0, categories.num_classes, batch)
    maps = categories.maps[labels].copy()
    probs = categories.probs[labels]
    live = (probs > 0)[..., None, None]
    maps += rng.normal(0.0, jitter, maps.shape) * live
    points, which = _chaos_game(maps, probs, rng, chains=chains, steps=steps)
    points = points.astype(np.float32)

    angle = rng.uniform(-np.pi / 9, np.pi / 9, batch)
    cos, sin = np.cos(angle), np.sin(angle)
    flip = np.where(rng.random(batch) < 0.5, -1.0, 1.0)
    px, py = points[..., 0], points[..., 1]
    points = np.stack(
        [(cos[:, None] * px - sin[:, None] * py) * flip[:, None], sin[:, None] * px + cos[:, None] * py], -1
    )
    points = points.astype(np.float32)

    hi = 2 * size
    low, high = points.min(1, keepdims=True), points.max(1, keepdims=True)
    extent = np.maximum((high - low).max(-1, keepdims=True), 1e-9)
    scale = rng.uniform(0.6, 1.0, (batch, 1, 1)) * (hi - 1)
    unit = (points - low) / extent  # longest side spans [0, 1]
    span = (high - low) / extent * scale
    origin = rng.random((batch, 1, 2)) * np.maximum(hi - 1 - span, 0.0)
    pix = np.clip(unit * scale + origin, 0, hi - 1).astype(np.int64)
    flat = (np.arange(batch)[:, None] * hi + pix[..., 1]) * hi + pix[..., 0]

    palette = _hsv_colours(rng, (batch, maps.shape[1]))
    single = rng.random(batch) < 0.4
    palette[single] = palette[single, :1]
    colours = np.take_along_axis(palette, which[..., None], axis=1)  # (B, N, 3)
    cells = batch * hi * hi
    density = np.bincount(flat.ravel(), minlength=cells).reshape(batch, hi, hi)
    colour = np.stack(
        [np.bincount(flat.ravel(), weights=colours[..., c].ravel(), minlength=cells) for c in range(3)], -1
    ).reshape(batch, hi, hi, 3)
    gain = rng.uniform(2.0, 6.0, (batch, 1, 1))
    alpha = 1.0 - np.exp(-density * gain)
    colour = colour / np.maximum(density, 1)[..., None] * alpha[..., None]  # premultiplied
    alpha = alpha.reshape(batch, size, 2, size, 2).mean((2, 4))
    colour = colour.reshape(batch, size, 2, size, 2, 3).mean((2, 4))

    given = background is not None
    if background is None:
        background = _backgrounds(rng, batch, size)
    faint = np.abs(background.mean((1, 2)) - palette.mean(1)).mean(-1) < 0.25
    if given:
        colour[faint] = alpha[faint][..., None] - colour[faint]  # premultiplied (1 - c) * alpha
    else:
        background[faint] = 1.0 - background[faint]
    image = colour + background * (1.0 - alpha[..., None])
    noise = rng.uniform(0.0, 0.04, (batch, 1, 1, 1))
    image = image + rng.normal(0.0, 1.0, image.shape) * noise
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), labels.astype(np.int64)
