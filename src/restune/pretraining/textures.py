"""Formula-driven texture categories: random sums of oriented waves, the second half of the pretraining images.

A fractal category is a shape; a texture category is a *statistic*: which frequencies, at which relative angles,
with which waveforms, warped how much. Each category is 2-3 wave components drawn once from a seed; an instance
rotates the whole pattern at random, rescales its frequencies by up to 20%, draws fresh phases and colours, and
lights it unevenly. Telling 64 such categories apart needs the oriented frequency detectors that the suite's texture,
scene and cell tasks read, yet no category is one of those tasks' classes: the suite asks for named families
(stripes, checks, dots, rings, fields, forest, ...) that these random spectra are not drawn from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from restune.pretraining.images import FractalCategories, render_batch

__all__ = ["TextureCategories", "make_textures", "render_textures", "render_composites"]

_TEXTURE_STREAM = 3
_WAVES = 3  # sine, square, triangle
_SHAPINGS = 3  # identity, ridges (|p|), threshold


@dataclass(frozen=True)
class TextureCategories:
    """A fixed set of texture categories, one row per category.

    Attributes:
        angles: ``(C, K)`` component orientations relative to the first (radians).
        freqs: ``(C, K)`` frequencies in cycles per image side.
        waves: ``(C, K)`` waveform index (sine, square, triangle).
        weights: ``(C, K)`` amplitudes; a category with fewer than K components has zero weights.
        warp: ``(C,)`` domain-warp amplitude in image units.
        shaping: ``(C,)`` point non-linearity index (identity, ridges, threshold).
    """

    angles: np.ndarray
    freqs: np.ndarray
    waves: np.ndarray
    weights: np.ndarray
    warp: np.ndarray
    shaping: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.angles)


def make_textures(num_classes: int, seed: int, *, max_components: int = 3) -> TextureCategories:
    """Draw ``num_classes`` texture categories from ``seed`` (a stream apart from the fractals' and the batches')."""
    rng = np.random.default_rng([seed, _TEXTURE_STREAM])
    shape = (num_classes, max_components)
    count = rng.integers(2, max_components + 1, num_classes)
    weights = rng.uniform(0.4, 1.0, shape) * (np.arange(max_components)[None] < count[:, None])
    weights[:, 0] = 1.0
    angles = rng.uniform(0.0, math.pi, shape)
    angles[:, 0] = 0.0
    return TextureCategories(
        angles=angles,
        freqs=np.exp(rng.uniform(math.log(1.5), math.log(9.0), shape)),
        waves=rng.integers(0, _WAVES, shape),
        weights=weights,
        warp=rng.choice([0.0, 0.03, 0.07], num_classes),
        shaping=rng.integers(0, _SHAPINGS, num_classes),
    )


def _wave(kind: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Unit-amplitude periodic waves of the given kinds, element-wise (``kind`` broadcasts against ``phase``)."""
    sine = np.sin(phase)
    square = np.sign(sine)
    triangle = 2.0 / math.pi * np.arcsin(sine)
    return np.where(kind == 0, sine, np.where(kind == 1, square, triangle))


def render_textures(
    categories: TextureCategories, labels: np.ndarray, rng: np.random.Generator, size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Render one instance of each category in ``labels``.

    Returns:
        ``(pattern, colours)``: the pattern in [0, 1], ``(B, size, size)``, and the two colours it blends between,
        ``(B, 2, 3)``, so a caller can composite other things over it before colouring.
    """
    batch = len(labels)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    y, x = coords[None, :, None], coords[None, None, :]
    turn = rng.uniform(0.0, math.pi, batch)[:, None] + categories.angles[labels]  # (B, K)
    freqs = categories.freqs[labels] * rng.uniform(0.8, 1.25, (batch, 1))
    phases = rng.uniform(0.0, 2 * math.pi, freqs.shape)
    warp_angle = rng.uniform(0.0, 2 * math.pi, batch)[:, None, None]
    warp_phase = rng.uniform(0.0, 2 * math.pi, batch)[:, None, None]
    warp = categories.warp[labels][:, None, None] * np.sin(
        2 * math.pi * 1.5 * (np.cos(warp_angle) * x + np.sin(warp_angle) * y) + warp_phase
    )
    pattern = np.zeros((batch, size, size), dtype=np.float32)
    for k in range(freqs.shape[1]):
        c, s = np.cos(turn[:, k])[:, None, None], np.sin(turn[:, k])[:, None, None]
        u = c * x + s * y + warp
        phase = 2 * math.pi * freqs[:, k, None, None] * u + phases[:, k, None, None]
        kind = categories.waves[labels, k][:, None, None]
        pattern += categories.weights[labels, k][:, None, None] * _wave(kind, phase)
    pattern /= categories.weights[labels].sum(1)[:, None, None]
    shaping = categories.shaping[labels][:, None, None]
    pattern = np.where(shaping == 1, 1.0 - 2.0 * np.abs(pattern), pattern)
    pattern = np.where(shaping == 2, np.tanh(4.0 * pattern), pattern)
    pattern = np.clip(0.5 + 0.5 * pattern * rng.uniform(1.0, 1.6, (batch, 1, 1)), 0.0, 1.0)
    low = rng.random((batch, 3))
    high = rng.random((batch, 3))
    faint = np.abs(high - low).sum(-1) < 0.5
    high[faint] = 1.0 - low[faint]
    return pattern.astype(np.float32), np.stack([low, high], 1)


def render_composites(
    fractals: FractalCategories, textures: TextureCategories, rng: np.random.Generator, batch: int, *, size: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fractal instance over a texture instance, unevenly lit: two labels per image, one per kind of feature.

    Returns:
        ``(images, fractal_labels, texture_labels)``: uint8 ``(batch, size, size, 3)`` and two int64 ``(batch,)``.
    """
    texture_labels = rng.integers(0, textures.num_classes, batch)
    pattern, colours = render_textures(textures, texture_labels, rng, size)
    background = colours[:, 0, None, None] + (colours[:, 1] - colours[:, 0])[:, None, None] * pattern[..., None]
    coords = (np.arange(size) + 0.5) / size - 0.5
    tilt = rng.normal(0.0, 0.5, (batch, 2))
    light = 1.0 + tilt[:, 0, None, None] * coords[None, :, None] + tilt[:, 1, None, None] * coords[None, None, :]
    background = np.clip(background * light[..., None], 0.0, 1.0)
    images, fractal_labels = render_batch(fractals, rng, batch, size=size, background=background)
    return images, fractal_labels, texture_labels.astype(np.int64)
