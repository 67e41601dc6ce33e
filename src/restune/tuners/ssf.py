"""SSF (Scale and Shift deep Features, NeurIPS 2022; dongzelian/SSF): z -> z * gamma + beta after frozen ops.

A per-channel affine map after the fused qkv, proj, fc1, fc2, norm1, norm2, the final norm and the patch embedding
(before the class token and position embedding). Mergeable exactly into the op before it: a linear's rows and bias,
a LayerNorm's weight and bias, the patch convolution's output channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from restune.contract import Binding, FoldPlan, Tuner, TunerConfig, default_sites, register_preset, register_tuner
from restune.sites import LINEAR, NORM, PATCH_EMBED, Site
from restune.spec import TuneSpec

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
    fold_order = 1  # after the weight deltas of the same op

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

    @classmethod
    def parameter_count(cls, config: SSFConfig, sites: list[Site]) -> int:
        return sum(2 * s.out_features for s in sites)

    @property
    def starts_at_pretrained(self) -> bool:
        return self.config.init_std == 0  # gamma = 1, beta = 0 exactly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift

    def fold(self, site: Site, plan: FoldPlan) -> None:
        """Fold into the op before: a linear's rows, a LayerNorm's affine, the patch convolution's channels."""
        scale, shift = self.scale.to(torch.float32), self.shift.to(torch.float32)
        module = site.module.proj if site.kind == PATCH_EMBED else site.module
        if site.kind in (LINEAR, PATCH_EMBED):
            weight = plan.get(module.weight)
            plan.set(module.weight, weight * scale.view(-1, *([1] * (weight.dim() - 1))))
        elif site.kind == NORM:
            plan.set(module.weight, plan.get(module.weight) * scale)
        else:
            raise ValueError(f"cannot fold {self.config.type} after a {site.kind} site ({site.name})")
        if module.bias is None:
            raise ValueError(f"{self.config.type} at {site.name} shifts a bias, but {site.name} has none")
        plan.set(module.bias, plan.get(module.bias) * scale + shift)


register_tuner("ssf", SSFConfig, SSF)
register_preset("ssf", lambda: TuneSpec([SSFConfig()]))  # 205,824 on ViT-B/16
