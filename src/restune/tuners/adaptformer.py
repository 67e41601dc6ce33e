"""AdaptFormer (NeurIPS 2022): a bottleneck beside the FFN, reading the FFN's input, with a fixed scale.

mlp'(u2) = mlp(u2) + s * (ReLU(u2 W_down + b_down) W_up + b_up), r = 8, s = 0.1 (docs/methods/baselines.md). The same
module as Res-Adapter on an ``mlp`` site; what differs is the defaults and the LoRA-style initialisation that makes
it start exactly at the pretrained model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from restune.contract import default_sites, register_preset, register_tuner
from restune.sites import Site
from restune.spec import TuneSpec
from restune.tuners.adapter import ResAdapter, ResAdapterConfig

__all__ = ["AdaptFormerConfig", "AdaptFormer"]


@dataclass
class AdaptFormerConfig(ResAdapterConfig):
    """AdaptFormer options.

    Attributes:
        dim: bottleneck width r (8 for the VTAB rows; PETL_Vision uses 64).
        activation: nonlinearity (ReLU).
        scale: ``scalar_0.1`` (fixed, the paper's default); ``scale`` with ``scale_init=0.1`` learns it.
    """

    sites: str | list[str] = default_sites(r"blocks\.\d+\.mlp")
    dim: int = 8
    activation: str = "relu"
    scale: str = "scalar_0.1"


class AdaptFormer(ResAdapter):
    """AdaptFormer's parallel bottleneck.

    Count per site: 2*D*r + r + D (+1 with a learnable scale); 13,064 per block and 156,768 for the ``adaptformer``
    preset on ViT-B/16. Init: W_down Kaiming-uniform(sqrt 5), W_up = 0, both biases 0. Not mergeable.
    """

    def __init__(self, config: AdaptFormerConfig, site: Site) -> None:
        super().__init__(config, site)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)


register_tuner("adaptformer", AdaptFormerConfig, AdaptFormer)

register_preset("adaptformer", lambda: TuneSpec([AdaptFormerConfig()]))  # 156,768 on ViT-B/16
