"""Res-Adapter (Res-Tuning, arXiv 2310.19859): a bottleneck MLP bound to a frozen op by a residual sum.

Two modules live here because the paper uses the adapter in two roles with different numerics:

- ``ResAdapter``, the standalone parallel tuner: OP'(u) = OP(u) + s * (phi(u W_down + b_down) W_up + b_up), with
  W_up = b_up = 0 so the tuned model starts as the pretrained one (docs/methods/res-tuning.md; the library's choice,
  there is no official standalone code).
- ``SwiftResAdapter``, the module of the bypass exactly as modelscope/swift's ``ResAdapter``:
  RA(z) = z + s * (phi(z W1 + c1) W2 + c2), identity shortcut inside, Xavier weights and N(0, 1e-6) biases
  (docs/methods/res-tuning.md, the bypass). The ``restuning_res_adapter`` parity fixture checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
from restune.layers.activations import make_activation
from restune.layers.scale import Scale, check_scale, scale_count
from restune.sites import ATTN, BLOCK, LINEAR, MLP, Site
from restune.spec import TuneSpec

__all__ = ["ResAdapterConfig", "ResAdapter", "SwiftResAdapter"]

SWIFT_BIAS_STD = 1e-6


@dataclass
class ResAdapterConfig(TunerConfig):
    """Res-Adapter options.

    Attributes:
        dim: bottleneck width r.
        activation: nonlinearity phi (``gelu`` is exact erf GELU, as swift).
        scale: ``scale`` (learnable scalar, default), ``scale_channel``, ``gate``, ``scalar_<v>`` or ``none``.
        scale_init: initial value of a learnable scale (default 1).
    """

    sites: str | list[str] = default_sites(r"blocks\.\d+\.mlp")
    dim: int = 10
    activation: str = "gelu"
    scale: str = "scale"
    scale_init: float | None = None

    def validate(self) -> None:
        positive_int(self, "dim")
        make_activation(self.type, self.activation)
        check_scale(self.type, self.scale, self.scale_init)


class ResAdapter(Tuner):
    """Standalone parallel Res-Adapter on a block, attention, MLP or linear site.

    Count per site: D_in*r + r + r*D_out + D_out + (scale: 1 | scale_channel: D_out | gate: D_out + 1 | 0), i.e.
    2*D*r + r + D + 1 on block/attn/mlp sites; the ``res_adapter`` preset (r = 10 on every mlp) has 193,668 on
    ViT-B/16. Not mergeable (nonlinear). Init: W_down Xavier-uniform, b_down ~ N(0, 1e-6) (swift/NOAH),
    W_up = b_up = 0, s = 1.
    """

    binding = Binding.PARALLEL
    site_kinds = frozenset({BLOCK, ATTN, MLP, LINEAR})

    def __init__(self, config: ResAdapterConfig, site: Site) -> None:
        super().__init__(config, site)
        factory = {"device": site.device, "dtype": site.dtype}
        self.down = nn.Linear(site.in_features, config.dim, **factory)
        self.act = make_activation(config.type, config.activation)
        self.up = nn.Linear(config.dim, site.out_features, **factory)
        self.scale = Scale(config.scale, site.out_features, config.scale_init, **factory)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.normal_(self.down.bias, std=SWIFT_BIAS_STD)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    @classmethod
    def parameter_count(cls, config: ResAdapterConfig, sites: list[Site]) -> int:
        return sum(
            s.in_features * config.dim + config.dim + config.dim * s.out_features + s.out_features
            + scale_count(config.scale, s.out_features)
            for s in sites
        )  # fmt: skip

    @property
    def starts_at_pretrained(self) -> bool:
        return True  # W_up = b_up = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.up(self.act(self.down(x))))


class SwiftResAdapter(nn.Module):
    """swift's Res-Adapter: RA(z) = z + s * (phi(z W1 + c1) W2 + c2), the building block of the bypass.

    Count: 2*D*r + r + D (+ the scale's count); 49,952 for D = 768, r = 32. The input is cast to the parameter
    dtype and the output back to the input dtype, as swift does. ``zero_init_last`` zeroes W2 and c2 (swift uses
    it on the last bypass block only).
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        *,
        activation: str = "gelu",
        scale: str = "none",
        zero_init_last: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_scale("SwiftResAdapter", scale)
        self.down_proj = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.act = make_activation("SwiftResAdapter", activation)
        self.up_proj = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.down_proj.weight)
            nn.init.normal_(self.down_proj.bias, std=SWIFT_BIAS_STD)
            if zero_init_last:
                nn.init.zeros_(self.up_proj.weight)
                nn.init.zeros_(self.up_proj.bias)
            else:
                nn.init.xavier_uniform_(self.up_proj.weight)
                nn.init.normal_(self.up_proj.bias, std=SWIFT_BIAS_STD)
        # Created after the Xavier initialisation so a gate keeps nn.Linear's default init, as in swift.
        self.scale = Scale(scale, dim, device=device, dtype=dtype)

    @property
    def mixes_tokens(self) -> bool:
        """Only a ``gate`` scale (averaged over tokens) makes one token's output read the others."""
        return self.scale.depends_on_input

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        in_dtype = z.dtype
        z = z.to(self.down_proj.weight.dtype)
        out = z + self.scale(self.up_proj(self.act(self.down_proj(z))))
        return out.to(in_dtype)


register_tuner("res_adapter", ResAdapterConfig, ResAdapter)
register_preset("res_adapter", lambda: TuneSpec([ResAdapterConfig()]))  # 193,668 on ViT-B/16
