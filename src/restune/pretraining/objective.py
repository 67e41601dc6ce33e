"""The dense half of the pretraining objective: predict hand-made features of masked patches (MaskFeat-style).

A class label per image gives a tiny ViT one weak signal per image, and on fractal categories it sat at chance for
the first thousand steps in our CPU runs. Predicting, for every masked 4x4 patch, its histogram of gradient
orientations (8 bins, magnitude-weighted, normalised) and its mean colour gives 32 targets per image from the first
step, needs context from the visible patches, and teaches edges and orientations, which is what the downstream tasks
read. None of these targets is a downstream label.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ORIENTATION_BINS", "patch_targets", "random_patch_mask", "mask_patches"]

ORIENTATION_BINS = 8
_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def patch_targets(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-patch targets (B, patches, 8 + 3) in row-major patch order, the ViT's token order.

    Each row is the L2-normalised (+0.1) orientation histogram of the grey image's Sobel gradients, then the mean
    colour.
    """
    grey = images.mean(1, keepdim=True)
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, _SOBEL.view(1, 1, 3, 3))
    gy = F.conv2d(padded, _SOBEL.t().reshape(1, 1, 3, 3))
    magnitude = (gx**2 + gy**2).sqrt()
    angle = torch.atan2(gy, gx) % math.pi
    index = (angle / math.pi * ORIENTATION_BINS).long().clamp(max=ORIENTATION_BINS - 1)
    side = images.shape[-1]
    hist = torch.zeros(images.shape[0], ORIENTATION_BINS, side, side).scatter_(1, index, magnitude)
    hist = F.avg_pool2d(hist, patch).flatten(2).transpose(1, 2)
    hist = hist / (hist.norm(dim=-1, keepdim=True) + 0.1)
    colour = F.avg_pool2d(images, patch).flatten(2).transpose(1, 2)
    return torch.cat([hist, colour], -1)


def random_patch_mask(batch: int, patches: int, ratio: float) -> torch.Tensor:
    """(B, patches) booleans, each True with probability ``ratio`` (drawn from the global torch RNG)."""
    return torch.rand(batch, patches) < ratio


def mask_patches(images: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """Images with the masked patches set to 0 (the normalised mean grey)."""
    grid = images.shape[-1] // patch
    pixels = mask.view(-1, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return images.masked_fill(pixels, 0.0)
