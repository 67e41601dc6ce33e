"""Res-Prefix (Res-Tuning, arXiv 2310.19859): prefix attention unbound from the backbone's attention.

attn'(u) = MHA(u) + s * [P_1 ... P_H] W_o with P_h = softmax(Q_h K^_h^T / sqrt(d_h)) V^_h: the prefix keys and values
K^, V^ (l, D) form a parallel attention term instead of being concatenated into the backbone's softmax. Q is the
backbone's own (frozen) query and W_o the frozen output projection, without a second bias. There is no official
code; this is the library's reading (docs/methods/res-tuning.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from restune.contract import (
    Binding,
    Tuner,
    TunerConfig,
    default_sites,
    positive_int,
    register_preset,
    register_tuner,
)
from restune.layers.scale import Scale, check_scale, scale_count
from restune.sites import ATTN, Site
from restune.spec import TuneSpec

__all__ = ["ResPrefixConfig", "ResPrefix", "AttentionBranchTuner", "attention_width"]


class AttentionBranchTuner(Tuner):
    """Base of tuners that add an attention term beside the backbone's MHA, read through its frozen projections.

    Subclasses implement ``keys_values(attention)`` returning K and V of shape (l, attn_dim); the binding hands
    ``branch`` the backbone's query (B, H, N, d_h) and applies ``self.scale`` and W_o.
    """

    binding = Binding.ATTENTION_BRANCH
    site_kinds = frozenset({ATTN})
    mixes_tokens = True
    scale: Scale

    def keys_values(self, attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def branch(self, q: torch.Tensor, attention: nn.Module) -> torch.Tensor:
        """The unscaled branch before W_o: heads concatenated, shape (B, N, attn_dim)."""
        batch, heads, tokens, head_dim = q.shape
        keys, values = self.keys_values(attention)
        keys = keys.to(q.dtype).view(1, -1, heads, head_dim).transpose(1, 2)
        values = values.to(q.dtype).view(1, -1, heads, head_dim).transpose(1, 2)
        weights = torch.softmax((q * (1.0 / math.sqrt(head_dim))) @ keys.transpose(-2, -1), dim=-1)
        return (weights @ values).transpose(1, 2).reshape(batch, tokens, heads * head_dim)


@dataclass
class ResPrefixConfig(TunerConfig):
    """Res-Prefix options.

    Attributes:
        length: number of prefix keys/values l.
        scale: Res-Tuner scale option (default a learnable scalar).
        scale_init: initial value of a learnable scale (default 1).
    """

    sites: str | list[str] = default_sites(r"blocks\.\d+\.attn")
    length: int = 10
    scale: str = "scale"
    scale_init: float | None = None

    def validate(self) -> None:
        positive_int(self, "length")
        check_scale(self.type, self.scale, self.scale_init)


class ResPrefix(AttentionBranchTuner):
    """Res-Prefix on an attention site.

    Count per block: 2*l*D + 1 (scalar scale); 184,332 for the ``res_prefix`` preset (l = 10) on ViT-B/16.
    Init: K^ Xavier-uniform on (l, D), V^ = 0 (the branch starts at exactly 0), s = 1. Not mergeable.
    """

    def __init__(self, config: ResPrefixConfig, site: Site) -> None:
        super().__init__(config, site)
        factory = {"device": site.device, "dtype": site.dtype}
        width = attention_width(site)
        self.keys = nn.Parameter(torch.empty(config.length, width, **factory))
        self.values = nn.Parameter(torch.zeros(config.length, width, **factory))
        with torch.no_grad():
            nn.init.xavier_uniform_(self.keys)
        self.scale = Scale(config.scale, site.out_features, config.scale_init, **factory)

    @classmethod
    def parameter_count(cls, config: ResPrefixConfig, sites: list[Site]) -> int:
        return sum(2 * config.length * attention_width(s) + scale_count(config.scale, s.out_features) for s in sites)

    @property
    def starts_at_pretrained(self) -> bool:
        return True  # V^ = 0

    def keys_values(self, attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values


def attention_width(site: Site) -> int:
    """Width of the keys and values of an attention site (one third of its fused qkv)."""
    return site.attention.qkv.out_features // 3


def frozen_projection(attention: nn.Module, index: int, tokens: torch.Tensor) -> torch.Tensor:
    """Project tokens through the frozen q (0), k (1) or v (2) row block of the fused qkv, never a tuner's delta."""
    qkv = attention.qkv
    width = qkv.out_features // 3
    rows = slice(index * width, (index + 1) * width)
    bias = None if qkv.bias is None else qkv.bias[rows]
    return F.linear(tokens, qkv.weight[rows], bias)


register_tuner("res_prefix", ResPrefixConfig, ResPrefix)
register_preset("res_prefix", lambda: TuneSpec([ResPrefixConfig()]))  # 184,332 on ViT-B/16
