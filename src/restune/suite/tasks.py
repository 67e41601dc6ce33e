"""The suite's tasks: one image generator ``(rng, label, size=32) -> uint8 (size, size, 3)`` per task.

The backbone this suite is meant for is pretrained on random IFS fractal categories over random-wave texture
categories, so no label here is a pretraining category: every task asks for something else (a digit, a named texture
family, a cell shape, a scene layout, a count, a position, an angle, a distance). Each generator draws the label's
content first and then independent nuisances (colours, background drift, clutter, jitter, sensor noise), so the label
is never readable from the mean colour.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple, Protocol

import numpy as np

from restune.optional import require
from restune.suite import draw as d

Array = np.ndarray

BRIGHT = 0.8  # share of objects brighter than their background (polarity is a nuisance, biased like VTAB's sets)


class ImageFn(Protocol):
    """A task generator: one image of class ``label``, drawn entirely from ``rng`` (so it is reproducible)."""

    def __call__(self, rng: np.random.Generator, label: int, size: int = 32) -> Array: ...


LabelFn = Callable[[np.random.Generator, int, int], Array]
SourceFn = Callable[[np.random.Generator, dict[str, Array]], dict[str, Array]]


def balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> Array:
    """``n`` labels as equal as possible per class, shuffled: every class appears in 800 training images."""
    return rng.permutation(np.arange(n) % num_classes)


class Task(NamedTuple):
    """A task: ``group``, ``num_classes`` and ``generator`` first, so ``TASKS[name][:3]`` reads as the triple.

    ``sources`` is for tasks drawn from a finite real dataset: given the per-split labels it returns, per split, one
    source index per image (disjoint between splits), and the writer passes it as ``generator(..., source=i)``.
    """

    group: str
    num_classes: int
    generator: ImageFn
    sample_labels: LabelFn = balanced_labels
    sources: SourceFn | None = None


# --- natural -------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def digit_data() -> tuple[Array, Array]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real scans, no download) as ([0, 1] images, targets)."""
    data = require("sklearn.datasets", "suite", "the suite's digits task").load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def digit_sources(rng: np.random.Generator, labels: dict[str, Array]) -> dict[str, Array]:
    """Assign each image a real digit scan so that no scan is shown in two splits.

    Each class's scans are shuffled and cut into one pool per split, as large as the split needs (proportionally
    smaller when the splits together need more scans than exist); a split cycles through its own pool only.
    """
    _, targets = digit_data()
    out = {split: np.empty(len(lab), dtype=np.int64) for split, lab in labels.items()}
    for c in range(10):
        pool = rng.permutation(np.flatnonzero(targets == c))
        need = {split: int((lab == c).sum()) for split, lab in labels.items()}
        total = sum(need.values())
        share = {s: n if total <= len(pool) else max(1, len(pool) * n // total) for s, n in need.items()}
        start = 0
        for split, lab in labels.items():
            own = pool[start : start + share[split]]
            start += share[split]
            if need[split]:
                out[split][lab == c] = np.resize(own, need[split])
    return out


def digits(rng: np.random.Generator, label: int, size: int = 32, source: int | None = None) -> Array:
    """A real handwritten digit, upscaled, rotated up to 11 degrees, scaled and shifted, in random colours.

    Without ``source`` a random scan of class ``label`` is used (for direct calls); the writer passes split-disjoint
    scans instead.
    """
    images, targets = digit_data()
    if source is None:
        source = int(rng.choice(np.flatnonzero(targets == label)))
    glyph = np.pad(images[source], 1)  # zero border: outside the box samples as background
    h = rng.uniform(0.6, 0.85)
    w = h * rng.uniform(0.7, 1.0)
    slack = min(0.08, (0.95 - h) / 2)  # roughly centred, like a house-number crop
    cy, cx = rng.uniform(0.5 - slack, 0.5 + slack), rng.uniform(0.38, 0.62)
    y, x = d.grid(size)
    u, v = d.rotate(y, x, cy, cx, rng.uniform(-0.2, 0.2))
    alpha = d.bilinear(glyph, (v / h + 0.5) * 8 + 0.5, (u / w + 0.5) * 8 + 0.5)
    base = d.dark(rng, 0.7)
    image = d.background(rng, size, base)
    d.clutter(rng, image, int(rng.integers(0, 4)))
    d.paint(image, np.clip(alpha * 1.4, 0, 1), d.contrasting(rng, base, brighter=BRIGHT))
    return d.to_uint8(rng, image)


TEXTURES = ("coarse stripes", "fine stripes", "checks", "dots", "blotches", "rings", "waves", "grain")


def _texture_pattern(rng: np.random.Generator, label: int, size: int) -> Array:
    y, x = d.grid(size)
    u, v = d.rotate(y, x, rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0, math.pi))
    tau = 2 * math.pi
    if label == 0:
        return np.sin(tau * u / rng.uniform(0.25, 0.4))
    if label == 1:
        return np.sin(tau * u / rng.uniform(0.1, 0.14))
    if label == 2:
        period = rng.uniform(0.18, 0.3)
        return np.sign(np.sin(tau * u / period) * np.sin(tau * v / period))
    if label == 3:
        period = rng.uniform(0.16, 0.26)
        du, dv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
        return np.sqrt(du**2 + dv**2) < rng.uniform(0.2, 0.32)
    if label == 4:
        return d.smooth_noise(rng, size, int(rng.integers(3, 6))) - 0.5
    if label == 5:
        return np.sin(tau * np.sqrt(u**2 + v**2) / rng.uniform(0.12, 0.25))
    if label == 6:
        return np.sin(tau * (u + rng.uniform(0.06, 0.1) * np.sin(tau * v / rng.uniform(0.3, 0.5))) / 0.2)
    return rng.normal(0, 1, (size, size))


def textures(rng: np.random.Generator, label: int, size: int = 32) -> Array:
    """One of :data:`TEXTURES` at a random angle, phase and scale, between two random colours, unevenly lit."""
    raw = np.broadcast_to(_texture_pattern(rng, label, size), (size, size)).astype(np.float32)
    pattern = np.clip(raw * rng.uniform(1.0, 3.0) * 0.5 + 0.5, 0, 1)
    low = d.colour(rng)
    image = d.mix(low, d.contrasting(rng, low, 0.25), pattern)
    image *= 0.75 + 0.5 * d.smooth_noise(rng, size, 2)[..., None]
    return d.to_uint8(rng, image, 0.04)


# --- specialized ---------------------------------------------------------------------------------------------------

CELLS = ("normal", "elongated", "lobed", "nucleated")


def _cell(rng: np.random.Generator, image: Array, kind: int, stain: Array) -> None:
    """One cell of morphology ``CELLS[kind]`` at a random place, size and angle."""
    r = rng.uniform(0.09, 0.15) * (1.15 if kind else 1.0)  # abnormal cells are enlarged, as in real atypia
    cy, cx = rng.uniform(0.12, 0.88), rng.uniform(0.12, 0.88)
    angle = rng.uniform(0, math.pi)
    if kind == 1:  # elongated: a clearly, but not extremely, flattened ellipse
        shape, params = d.ellipse, (r * 1.3, r * rng.uniform(0.45, 0.65), angle)
    elif kind == 2:  # lobed: a few bumps on the outline
        shape, params = d.blob, (r, int(rng.integers(3, 6)), rng.uniform(0.22, 0.38), angle)
    else:  # normal (and nucleated) cells are slightly oval too, so roundness is a matter of degree
        shape, params = d.ellipse, (r, r * rng.uniform(0.8, 1.0), angle)
    tone = np.clip(stain * rng.uniform(0.8, 1.2) + (0.15 if kind == 3 else 0.0), 0, 1)
    d.stamp(image, tone, r * 1.4, shape, cy, cx, *params, opacity=0.9)
    if kind == 3:
        ny, nx = cy + rng.normal(0, 0.02), cx + rng.normal(0, 0.02)
        d.stamp(image, np.clip(stain * 0.6, 0, 1), r * 0.4, d.disc, ny, nx, r * rng.uniform(0.3, 0.4))


def cells(rng: np.random.Generator, label: int, size: int = 32) -> Array:
    """A stained-tissue field of 3-5 cells; the label is which abnormality (:data:`CELLS`), if any, is present.

    Like a pathology patch (PatchCamelyon), some cells look normal and the label rests on one to three enlarged,
    abnormal ones among them; stain colours, cell number, size, placement and overlap vary freely.
    """
    tissue = np.array([0.95, 0.8, 0.88], dtype=np.float32) + rng.normal(0, 0.08, 3).astype(np.float32)
    stain = np.array([0.45, 0.2, 0.6], dtype=np.float32) + rng.normal(0, 0.12, 3).astype(np.float32)
    image = d.background(rng, size, np.clip(tissue, 0, 1), 0.3)
    image = d.mix(image, np.clip(tissue * 0.8, 0, 1), d.smooth_noise(rng, size, 6) * 0.5)
    total = int(rng.integers(3, 6))
    abnormal = int(rng.integers(1, 4)) if label else 0
    for i in range(total):
        _cell(rng, image, label if i < abnormal else 0, stain)
    return d.to_uint8(rng, image, 0.04)


SCENES = ("fields", "forest", "residential", "river", "highway")


def _land(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    base = d.colour(rng) * 0.7 + 0.15
    image = d.background(rng, size, base, 0.2)
    return d.mix(image, base * 0.8, d.smooth_noise(rng, size, 8) * 0.6), base


def remote(rng: np.random.Generator, label: int, size: int = 32) -> Array:
    """An overhead scene of type :data:`SCENES`; colours are random, so the layout is what tells them apart."""
    y, x = d.grid(size)
    image, base = _land(rng, size)
    angle = rng.uniform(0, math.pi)
    u, v = d.rotate(y, x, rng.uniform(0, 1), rng.uniform(0, 1), angle)
    if label == 0:  # patchwork of plots, each with its own shade and furrow direction
        cell = rng.uniform(0.25, 0.45)
        iu, iv = np.floor(u / cell), np.floor(v / cell)
        plot = (iu * 7 + iv * 13) % 5 / 4.0
        furrows = np.sin(2 * math.pi * np.where((iu + iv) % 2 == 0, u, v) / 0.09) * 0.5 + 0.5
        image = d.mix(image, d.contrasting(rng, base, 0.2), np.broadcast_to(plot * 0.7 + furrows * 0.3, (size, size)))
    elif label == 1:  # closed canopy of overlapping crowns
        for _ in range(int(rng.integers(25, 40))):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.04, 0.08)
            d.stamp(image, np.clip(base * rng.uniform(0.5, 1.3), 0, 1), r, d.disc, cy, cx, r)
    elif label == 2:  # street grid with houses
        block = rng.uniform(0.2, 0.3)
        fu, fv = (u / block) % 1, (v / block) % 1
        road = d.contrasting(rng, base, 0.2)
        houses = (np.abs(fu - 0.5) < 0.22) & (np.abs(fv - 0.5) < 0.22)
        d.paint(image, np.broadcast_to(houses, (size, size)).astype(np.float32), d.colour(rng))
        streets = np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv)) < 0.08
        d.paint(image, np.broadcast_to(streets, (size, size)).astype(np.float32), road)
    elif label == 3:  # a meandering band of water
        bend = rng.uniform(0.08, 0.18) * np.sin(2 * math.pi * u / rng.uniform(0.5, 0.9) + rng.uniform(0, 6.3))
        sd = rng.uniform(0.05, 0.09) - np.abs(v - bend)
        d.paint(image, d.coverage(sd, size), d.contrasting(rng, base, 0.2))
    else:  # a straight road with a dashed centre line
        half = rng.uniform(0.07, 0.11)
        d.paint(image, d.coverage(half - np.abs(v), size), d.contrasting(rng, base, 0.2))
        dash = (np.abs(v) < 0.6 / size) & ((u / 0.12) % 1 < 0.5)
        d.paint(image, np.broadcast_to(dash, (size, size)).astype(np.float32), d.colour(rng))
    return d.to_uint8(rng, image, 0.04)


# --- structured ----------------------------------------------------------------------------------------------------


def _scene(rng: np.random.Generator, size: int, clutter: int = 3) -> tuple[Array, Array]:
    """A drifting random background with up to ``clutter`` faint lines, and its base colour."""
    base = d.dark(rng)
    image = d.background(rng, size, base)
    d.clutter(rng, image, int(rng.integers(0, clutter + 1)))
    return image, base


def _place(rng: np.random.Generator, count: int, radius: tuple[float, float]) -> list[tuple[float, float, float]]:
    """``count`` non-overlapping circles (cy, cx, r) inside the image, by rejection sampling."""
    placed: list[tuple[float, float, float]] = []
    while len(placed) < count:
        r = rng.uniform(*radius)
        cy, cx = rng.uniform(r + 0.03, 1 - r - 0.03), rng.uniform(r + 0.03, 1 - r - 0.03)
        if all(math.hypot(cy - py, cx - px) > r + pr + 0.04 for py, px, pr in placed):
            placed.append((cy, cx, r))
    return placed


def count(rng: np.random.Generator, label: int, size: int = 32) -> Array:
    """``label + 1`` separate objects of random shape, size and colour (CLEVR-count-like)."""
    image, base = _scene(rng, size)
    for cy, cx, r in _place(rng, label + 1, (0.05, 0.09)):
        shape, params = d.random_shape(rng, r)
        d.stamp(image, d.contrasting(rng, base, brighter=BRIGHT), r, shape, cy, cx, *params)
    return d.to_uint8(rng, image)


LOCATION_BINS = 8


def location(rng: np.random.Generator, label: int, size: int = 32) -> Array:
    """One object whose centre's x position falls in bin ``label`` of :data:`LOCATION_BINS` (dSprites-location-like)."""
    image, base = _scene(rng, size)
    r = rng.uniform(0.07, 0.12)
    cy, cx = rng.uniform(0.12, 0.88), 0.1 + 0.8 * (label + rng.uniform(0, 1)) / LOCATION_BINS
    shape, params = d.random_shape(rng, r)
    d.stamp(image, d.contrasting(rng, base, brighter=BRIGHT), r, shape, cy, cx, *params)
    return d.to_uint8(rng, image)


ORIENTATION_BINS = 16  # as VTAB's dSprites-orientation


def orientation(rng: np.random.Generator, label: int, size: int = 32) -> Array:
    """An elongated bar or ellipse whose angle (mod 180 degrees) is in bin ``label`` (dSprites-orientation-like)."""
    image, base = _scene(rng, size)
    angle = math.pi * (label + rng.uniform(0, 1)) / ORIENTATION_BINS
    cy, cx = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
    length, width = rng.uniform(0.17, 0.3), rng.uniform(0.04, 0.07)
    shape = d.box if rng.random() < 0.5 else d.ellipse
    colour = d.contrasting(rng, base, brighter=BRIGHT)
    d.stamp(image, colour, length + width, shape, cy, cx, length, width, angle)
    return d.to_uint8(rng, image)


DISTANCE_EDGES = np.geomspace(1.0, 6.0, 6)  # 5 bins of camera distance, equal in log-distance


def _ground_scene(rng: np.random.Generator, size: int, horizon: float) -> tuple[Array, Array]:
    """Sky above ``horizon``, a ground plane lit brighter towards the camera below it; returns (image, ground)."""
    y, _ = d.grid(size)
    sky, ground = d.colour(rng), d.dark(rng)
    image = np.where(y[..., None] < horizon, sky, ground * (0.6 + 0.6 * y[..., None])).astype(np.float32)
    return image + (d.smooth_noise(rng, size, 4, 3) - 0.5) * 0.2, ground


def distance(rng: np.random.Generator, label: int, size: int = 32) -> Array:
    """A ground-plane scene with 1-3 objects; the label is the distance bin of the *nearest* one (KITTI-dist-like).

    Perspective ties distance to both the object's apparent size and how far below the horizon it stands, while
    object kind, base size (+-20%), colour, horizon height and the farther objects are nuisances.
    """
    horizon = rng.uniform(0.25, 0.45)
    image, ground = _ground_scene(rng, size, horizon)
    nearest = math.exp(rng.uniform(math.log(DISTANCE_EDGES[label]), math.log(DISTANCE_EDGES[label + 1])))
    far = [rng.uniform(nearest, DISTANCE_EDGES[-1] * 1.5) for _ in range(int(rng.integers(0, 3)))]
    for dist in sorted(far, reverse=True) + [nearest]:  # painter's order: far first
        foot = horizon + (0.97 - horizon) / dist
        height = rng.uniform(0.3, 0.45) / dist
        width = height * rng.uniform(0.6, 1.6)
        cx = rng.uniform(0.1, 0.9)
        d.stamp(image, 0.0, width * 0.7, d.ellipse, foot, cx, width * 0.7, height * 0.12, opacity=0.5)
        extent = max(width, height) / 2
        d.stamp(
            image, d.contrasting(rng, ground, 0.15, BRIGHT), extent, d.box, foot - height / 2, cx, width / 2, height / 2
        )
    return d.to_uint8(rng, image)


# --- registry ------------------------------------------------------------------------------------------------------

TASKS: dict[str, Task] = {
    "digits": Task("natural", 10, digits, sources=digit_sources),
    "textures": Task("natural", len(TEXTURES), textures),
    "cells": Task("specialized", len(CELLS), cells),
    "remote": Task("specialized", len(SCENES), remote),
    "count": Task("structured", 6, count),
    "location": Task("structured", LOCATION_BINS, location),
    "orientation": Task("structured", ORIENTATION_BINS, orientation),
    "distance": Task("structured", len(DISTANCE_EDGES) - 1, distance),
}

SUITE_GROUPS: dict[str, str] = {name: task.group for name, task in TASKS.items()}
