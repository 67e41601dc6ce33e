"""Shared helpers: a tiny timm ViT with seeded, non-trivial weights (docs/fixtures.md §3) and random inputs.

The functions are importable (``from conftest import make_vit``) and also exposed as fixtures.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

FIXTURES = Path(__file__).parent / "fixtures" / "official"

TINY_VIT = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 4,
    "mlp_ratio": 2,
    "num_classes": 5,
}


def reinit_nontrivial_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Redraw every parameter so activations and logits are O(1), from seeded generators.

    Linear/Conv weights N(0, 1/fan_in), their biases N(0, 0.1^2), LayerNorm weights N(1, 0.1^2) and biases
    N(0, 0.1^2), class token and position embedding N(0, 0.5^2), anything else N(0, 0.1^2). Each tensor has its own
    generator seeded from ``seed`` and its name, so two models that differ only in the head (another
    ``num_classes``) or only in later blocks share every other value.
    """
    rules: dict[str, tuple[float, float]] = {}
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            rules[f"{dot}weight"] = (0.0, 1.0 / math.sqrt(module.weight[0].numel()))
            rules[f"{dot}bias"] = (0.0, 0.1)
        elif isinstance(module, nn.LayerNorm):
            rules[f"{dot}weight"] = (1.0, 0.1)
            rules[f"{dot}bias"] = (0.0, 0.1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            default = 0.5 if name.split(".")[-1] in ("cls_token", "pos_embed", "reg_token") else 0.1
            mean, std = rules.get(name, (0.0, default))
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            value = torch.randn(param.shape, generator=gen, dtype=torch.float64) * std + mean
            param.copy_(value.to(param.dtype))
    return model


def make_vit(
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    **overrides: int,
) -> VisionTransformer:
    """The tiny timm ViT of the fixtures (32 px, patch 8, D 32, depth 2, 4 heads, 5 classes), eval mode.

    ``overrides`` change any of ``TINY_VIT`` (e.g. ``depth=3``); ``seed`` picks the weights.
    """
    kwargs = {**TINY_VIT, **overrides}
    model = VisionTransformer(qkv_bias=True, class_token=True, global_pool="token", **kwargs)
    reinit_nontrivial_(model, seed)
    return model.to(dtype).eval()


def make_images(seed: int = 100, batch: int = 2, size: int = 32, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Images N(0, 1) of shape (batch, 3, size, size)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen, dtype=torch.float64).to(dtype)


def randn_like(tensor: torch.Tensor, seed: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    """A seeded N(mean, std^2) tensor with the shape, dtype and device of ``tensor``."""
    gen = torch.Generator().manual_seed(seed)
    value = torch.randn(tensor.shape, generator=gen, dtype=torch.float64) * std + mean
    return value.to(dtype=tensor.dtype, device=tensor.device)


def randomize_(params: list[tuple[str, torch.Tensor]], seed: int, std: float = 0.3) -> None:
    """Overwrite tensors in place with seeded N(0, std^2) values (mean 1 for anything named like a scale)."""
    with torch.no_grad():
        for offset, (name, param) in enumerate(params):
            mean = 1.0 if "scale" in name else 0.0
            param.copy_(randn_like(param, seed + offset, std, mean))


@pytest.fixture
def vit() -> VisionTransformer:
    """A fresh tiny ViT (seed 0), fp32, eval mode."""
    return make_vit(0)


@pytest.fixture
def images() -> torch.Tensor:
    """Two 32 x 32 RGB images, N(0, 1)."""
    return make_images(100)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run a test with one intra-op thread: tiny models are many times faster so on a small, busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
