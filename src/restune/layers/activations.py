"""Activation functions a tuner config may name, so configs stay plain strings in JSON and YAML."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["make_activation", "ACTIVATIONS"]


class QuickGELU(nn.Module):
    """z * sigmoid(1.702 z): the activation of NOAH's adapter and CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),  # exact (erf), the swift default
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}


def make_activation(owner: str, name: str) -> nn.Module:
    """A fresh activation module; an unknown name raises with the allowed names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{owner}: unknown activation {name!r}; use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()
