"""SSF (Scale and Shift deep Features, NeurIPS 2022; dongzelian/SSF): z -> z * gamma + beta after frozen ops.

A per-channel affine map after the fused qkv, proj, fc1, fc2, norm1, norm2, the final norm and the patch embedding
(before the class token and position embedding). Mergeable exactly into the op before it: a linear's rows and bias,
a LayerNorm's weight and bias, the patch convolution's output channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from restune.sites import LINEAR, NORM, PATCH_EMBED, Site
from restune.tuners.base import Binding, Tuner, TunerConfig, default_sites, register_tuner

__all__ = ["SSFConfig", "SSF", "SSF_SITES"]

SSF_SITES = r"(blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|norm1|norm2)|norm|patch_embed)"


@dataclass
class SSFConfig(TunerConfig):
    """SSF options.

    Attributes:
        init_std: gamma ~ N(1, init_std^2) and beta ~ N(0, init_std^2), as in the SSF code (0.02).
    """

    sites: str | list[str] = default_sites(SSF_SITES)
    init_std: float = 0.02

    def validate(self) -> None:
        if not self.init_std >= 0:
            raise ValueError(f"{self.type}: 'init_std' must be >= 0, got {self.init_std!r}")


class SSF(Tuner):
    """Scale and shift of a site's output channels.

    Count per site: 2 * C for C output channels; the ``ssf`` preset has 16,896 per block and 205,824 on ViT-B/16.
    """

    binding = Binding.AFFINE
    site_kinds = frozenset({LINEAR, NORM, PATCH_EMBED})
    position = "after"

    def __init__(self, config: SSFConfig, site: Site) -> None:
        super().__init__(config, site)
        if site.rows is not None:
            raise ValueError(f"{config.type}: bind SSF to the fused qkv, not to the virtual row block {site.name}")
        factory = {"device": site.device, "dtype": site.dtype}
        self.scale = nn.Parameter(torch.empty(site.out_features, **factory))
        self.shift = nn.Parameter(torch.empty(site.out_features, **factory))
        with torch.no_grad():
            nn.init.normal_(self.scale, mean=1.0, std=config.init_std)
            nn.init.normal_(self.shift, mean=0.0, std=config.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


register_tuner("ssf", SSFConfig, SSF)
