"""Res-Attn (arXiv 2312.16916): a parallel low-rank multi-head attention Res-Tuner.

R(u) = [o_1 ... o_h] B_o with o_j = softmax(q_j k_j^T / sqrt(d)) v_j, q = u A_q, k = u A_k, v = u A_v (bias-free
D -> r projections split into h heads of width d = r / h), and OP'(u) = OP(u) + s * R(u). Only the abstract is public
and there is no official code: this is the library's reading (docs/methods/res-attn.md).
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
from restune.sites import ATTN, BLOCK, MLP, Site
from restune.spec import TuneSpec

__all__ = ["ResAttnConfig", "ResAttn"]


@dataclass
class ResAttnConfig(TunerConfig):
    """Res-Attn options.

    Attributes:
        r: total width of the low-rank q, k, v.
        heads: number of heads h (r must be divisible by h).
        prefix_length: if > 0, keys and values come from this many learnable tokens T projected by A_k, A_v instead
            of from u (a low-rank Res-Prompt; adds prefix_length * D parameters per site).
        attn_dropout: dropout on the branch's attention weights during training.
        scale: Res-Tuner scale option (default a learnable scalar).
        scale_init: initial value of a learnable scale (default 1).
    """

    sites: str | list[str] = default_sites(r"blocks\.\d+\.attn")
    r: int = 16
    heads: int = 4
    prefix_length: int = 0
    attn_dropout: float = 0.0
    scale: str = "scale"
    scale_init: float | None = None

    def validate(self) -> None:
        positive_int(self, "r")
        positive_int(self, "heads")
        if self.r % self.heads:
            raise ValueError(f"{self.type}: r ({self.r}) must be divisible by heads ({self.heads})")
        if isinstance(self.prefix_length, bool) or not isinstance(self.prefix_length, int) or self.prefix_length < 0:
            raise ValueError(f"{self.type}: 'prefix_length' must be a non-negative integer, got {self.prefix_length!r}")
        if not 0.0 <= self.attn_dropout < 1.0:
            raise ValueError(f"{self.type}: 'attn_dropout' must be in [0, 1), got {self.attn_dropout!r}")
        check_scale(self.type, self.scale, self.scale_init)


class ResAttn(Tuner):
    """Res-Attn, parallel to an attention (default), MLP or block site.

    Count per site: 4*D*r + 1 with the scalar scale (+ prefix_length*D); 589,836 for ``res_attn`` (r = 16, h = 4)
    on ViT-B/16. Init: A_q, A_k, A_v Kaiming-uniform(sqrt 5) (nn.Linear's default), B_o = 0, s = 1, so the model
    starts unchanged. Not mergeable.
    """

    binding = Binding.PARALLEL
    site_kinds = frozenset({ATTN, MLP, BLOCK})
    mixes_tokens = True
    first_tokens_supported = True  # forward(x, first_tokens=n): outputs for the first n queries, keys from all

    def __init__(self, config: ResAttnConfig, site: Site) -> None:
        super().__init__(config, site)
        factory = {"device": site.device, "dtype": site.dtype}
        self.heads = config.heads
        self.query = nn.Linear(site.in_features, config.r, bias=False, **factory)
        self.key = nn.Linear(site.in_features, config.r, bias=False, **factory)
        self.value = nn.Linear(site.in_features, config.r, bias=False, **factory)
        self.out = nn.Linear(config.r, site.out_features, bias=False, **factory)
        with torch.no_grad():
            nn.init.zeros_(self.out.weight)
        self.prefix = None
        if config.prefix_length:
            self.prefix = nn.Parameter(torch.empty(config.prefix_length, site.in_features, **factory))
            with torch.no_grad():
                nn.init.xavier_uniform_(self.prefix)
        self.attn_dropout = config.attn_dropout
        self.scale = Scale(config.scale, site.out_features, config.scale_init, **factory)

    @classmethod
    def parameter_count(cls, config: ResAttnConfig, sites: list[Site]) -> int:
        return sum(
            (3 * s.in_features + s.out_features) * config.r + config.prefix_length * s.in_features
            + scale_count(config.scale, s.out_features)
            for s in sites
        )  # fmt: skip

    @property
    def starts_at_pretrained(self) -> bool:
        return True  # B_o = 0

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        *lead, tokens, width = x.shape
        return x.view(*lead, tokens, self.heads, width // self.heads).transpose(-3, -2)

    def forward(self, x: torch.Tensor, first_tokens: int | None = None) -> torch.Tensor:
        """R(x), or with ``first_tokens`` = n its rows for the first n tokens only (queries pruned, keys all)."""
        source = x if self.prefix is None else self.prefix.unsqueeze(0).expand(x.shape[0], -1, -1)
        queries = x if first_tokens is None else x[..., :first_tokens, :]
        q, k, v = self._heads(self.query(queries)), self._heads(self.key(source)), self._heads(self.value(source))
        dropout = self.attn_dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=1.0 / math.sqrt(q.shape[-1]))
        o = o.transpose(-3, -2).reshape(*queries.shape[:-1], -1)
        return self.scale(self.out(o))


register_tuner("res_attn", ResAttnConfig, ResAttn)
register_preset("res_attn", lambda: TuneSpec([ResAttnConfig()]))  # 589,836 on ViT-B/16
