"""The bottleneck Adapter as NOAH reproduced it (the "Adapter" row of the VTAB-1k tables): sequential on the FFN.

A(m) = m + phi(m W_down + b_down) W_up + b_up applied to the output m of ``mlp``, inside the residual branch, with
QuickGELU and r = 8, no scale and no dropout (NOAH ``adapter_super.py``; docs/methods/baselines.md). Unlike
Res-Adapter it reads the op's output, not its input, so it is bound to the op rather than beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from restune.contract import Binding, Tuner, TunerConfig, default_sites, positive_int, register_preset, register_tuner
from restune.layers.activations import make_activation
from restune.sites import ATTN, BLOCK, LINEAR, MLP, Site
from restune.spec import TuneSpec
from restune.tuners.adapter import SWIFT_BIAS_STD

__all__ = ["AdapterConfig", "Adapter"]


@dataclass
class AdapterConfig(TunerConfig):
    """Sequential adapter options.

    Attributes:
        dim: bottleneck width r.
        activation: nonlinearity phi (NOAH: QuickGELU).
    """

    sites: str | list[str] = default_sites(r"blocks\.\d+\.mlp")
    dim: int = 8
    activation: str = "quick_gelu"

    def validate(self) -> None:
        positive_int(self, "dim")
        make_activation(self.type, self.activation)


class Adapter(Tuner):
    """A sequential bottleneck on the output of a block, attention, MLP or linear site.

    Count per site: 2*D*r + r + D; 13,064 per block and 156,768 for the ``adapter`` preset on ViT-B/16. Init (NOAH):
    both weights Xavier-uniform, both biases N(0, 1e-6), so it is close to, not exactly, the identity. Not mergeable.
    """

    binding = Binding.SEQUENTIAL
    site_kinds = frozenset({BLOCK, ATTN, MLP, LINEAR})

    def __init__(self, config: AdapterConfig, site: Site) -> None:
        super().__init__(config, site)
        factory = {"device": site.device, "dtype": site.dtype}
        self.down = nn.Linear(site.out_features, config.dim, **factory)
        self.act = make_activation(config.type, config.activation)
        self.up = nn.Linear(config.dim, site.out_features, **factory)
        with torch.no_grad():
            for linear in (self.down, self.up):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.normal_(linear.bias, std=SWIFT_BIAS_STD)

    @classmethod
    def parameter_count(cls, config: AdapterConfig, sites: list[Site]) -> int:
        return sum(2 * s.out_features * config.dim + config.dim + s.out_features for s in sites)

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        return output + self.up(self.act(self.down(output)))


register_tuner("adapter", AdapterConfig, Adapter)

register_preset("adapter", lambda: TuneSpec([AdapterConfig()]))  # 156,768 on ViT-B/16
