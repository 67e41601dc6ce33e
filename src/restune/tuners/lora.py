"""LoRA (arXiv 2106.09685, peft's numerics) and Res-LoRA (Res-Tuning, arXiv 2310.19859).

Both add a rank-r product to a frozen linear: lin'(x) = x W^T + b + s * (drop(x) A^T) B^T with A (r, D_in)
Kaiming-uniform(sqrt 5) and B (D_out, r) = 0, so training starts at the pretrained model. They differ only in s:
LoRA uses peft's fixed alpha / r (or alpha / sqrt(r) with rsLoRA); Res-LoRA's s is a Res-Tuner scale (a learnable
scalar initialised to 1 by default, docs/methods/res-tuning.md). Both are weight deltas and merge exactly:
W_pt <- W_pt + s * B A.
"""

from __future__ import annotations

import math
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
from restune.layers.scale import Scale, check_scale, scale_count
from restune.sites import LINEAR, Site
from restune.spec import TuneSpec

__all__ = ["LoraConfig", "ResLoraConfig", "LowRankDelta"]


def _check_dropout(config: TunerConfig, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{config.type}: 'dropout' must be in [0, 1), got {value!r}")


@dataclass
class LoraConfig(TunerConfig):
    """LoRA options; defaults are the ``lora`` preset of the papers' tables (r = 8, alpha = 8 on split q and v).

    Attributes:
        r: rank.
        alpha: peft's ``lora_alpha``; the delta is scaled by alpha / r.
        dropout: dropout on the LoRA input (peft's ``lora_dropout``).
        use_rslora: scale by alpha / sqrt(r) instead (peft's ``use_rslora``).
    """

    sites: str | list[str] = default_sites(["attn.q", "attn.v"])
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False

    def validate(self) -> None:
        positive_int(self, "r")
        if not self.alpha > 0:
            raise ValueError(f"{self.type}: 'alpha' must be positive, got {self.alpha!r}")
        _check_dropout(self, self.dropout)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class ResLoraConfig(TunerConfig):
    """Res-LoRA options; defaults are the ``res_lora`` preset (r = 8 on split q and v, learnable scalar scale).

    Attributes:
        r: rank.
        scale: Res-Tuner scale option (``gate`` is refused: it would make the delta input-dependent).
        scale_init: initial value of a learnable scale (default 1).
        dropout: dropout on the low-rank input.
    """

    sites: str | list[str] = default_sites(["attn.q", "attn.v"])
    r: int = 8
    scale: str = "scale"
    scale_init: float | None = None
    dropout: float = 0.0

    def validate(self) -> None:
        positive_int(self, "r")
        check_scale(self.type, self.scale, self.scale_init)
        if self.scale == "gate":
            raise ValueError(f"{self.type}: a 'gate' scale would make Res-LoRA unmergeable; use scale/scale_channel")
        _check_dropout(self, self.dropout)


class LowRankDelta(Tuner):
    """s * (drop(x) A^T) B^T added to a linear's output: LoRA or Res-LoRA.

    Count per site: r * (D_in + D_out), plus the scale's count for Res-LoRA (1 by default). ``lora`` (q, v, r = 8):
    294,912 on ViT-B/16; ``res_lora``: 294,936. Mergeable: ``delta_weight() = s * B @ A``.
    """

    binding = Binding.WEIGHT_DELTA
    site_kinds = frozenset({LINEAR})

    def __init__(self, config: LoraConfig | ResLoraConfig, site: Site) -> None:
        super().__init__(config, site)
        factory = {"device": site.device, "dtype": site.dtype}
        self.A = nn.Parameter(torch.empty(config.r, site.in_features, **factory))
        self.B = nn.Parameter(torch.zeros(site.out_features, config.r, **factory))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if isinstance(config, LoraConfig):
            self.scale = Scale("fixed", site.out_features, value=config.scaling, **factory)
        else:
            self.scale = Scale(config.scale, site.out_features, config.scale_init, **factory)

    @classmethod
    def parameter_count(cls, config: LoraConfig | ResLoraConfig, sites: list[Site]) -> int:
        scale = config.scale if isinstance(config, ResLoraConfig) else "none"
        return sum(config.r * (s.in_features + s.out_features) + scale_count(scale, s.out_features) for s in sites)

    @property
    def starts_at_pretrained(self) -> bool:
        return True  # B = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.dropout(x) @ self.A.t() @ self.B.t())

    def delta_weight(self) -> torch.Tensor:
        factor = self.scale.channel_factor()
        delta = self.B @ self.A
        if factor is None:
            return delta
        return delta * (factor.unsqueeze(-1) if factor.dim() == 1 else factor)


register_tuner("lora", LoraConfig, LowRankDelta)
register_tuner("res_lora", ResLoraConfig, LowRankDelta)
register_preset("lora", lambda: TuneSpec([LoraConfig()]))  # 294,912 on ViT-B/16
register_preset("res_lora", lambda: TuneSpec([ResLoraConfig()]))  # 294,936
