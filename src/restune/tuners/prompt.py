"""Res-Prompt (Res-Tuning, arXiv 2310.19859): prompt tokens read through the frozen key/value projections.

attn'(u) = MHA(u) + s * [P_1' ... P_H'] W_o with K_p = P W_k + b_k and V_p = P W_v + b_v from learnable tokens P
(l, D), P_h' = softmax(Q_h K_p,h^T / sqrt(d_h)) V_p,h. s starts at 0: the branch is a convex combination of the rows
of V_p, which no choice of distinct prompts makes vanish (docs/methods/res-tuning.md). No official code exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from restune.contract import TunerConfig, default_sites, positive_int, register_preset, register_tuner
from restune.layers.scale import Scale, check_scale, scale_count
from restune.sites import Site
from restune.spec import TuneSpec
from restune.tuners.prefix import AttentionBranchTuner, frozen_projection

__all__ = ["ResPromptConfig", "ResPrompt"]


@dataclass
class ResPromptConfig(TunerConfig):
    """Res-Prompt options.

    Attributes:
        length: number of prompt tokens l.
        scale: Res-Tuner scale option (default a learnable scalar).
        scale_init: initial value of a learnable scale; None means 0, so the model starts unchanged (set 1.0 for
            the variant that starts with the branch switched on).
    """

    sites: str | list[str] = default_sites(r"blocks\.\d+\.attn")
    length: int = 10
    scale: str = "scale"
    scale_init: float | None = None

    def validate(self) -> None:
        positive_int(self, "length")
        check_scale(self.type, self.scale, self.scale_init)


class ResPrompt(AttentionBranchTuner):
    """Res-Prompt on an attention site.

    Count per block: l*D + 1 (scalar scale); 92,172 for the ``res_prompt`` preset (l = 10) on ViT-B/16.
    Init: P ~ U(-v, v) with VPT's bound v = sqrt(6 / (3 p^2 + D)) for patch size p (0.0625 on ViT-B/16);
    a learnable scale starts at 0. Not mergeable.
    """

    def __init__(self, config: ResPromptConfig, site: Site) -> None:
        super().__init__(config, site)
        factory = {"device": site.device, "dtype": site.dtype}
        self.tokens = nn.Parameter(torch.empty(config.length, site.in_features, **factory))
        patch = site.patch_size or 16
        bound = math.sqrt(6.0 / (3 * patch * patch + site.in_features))
        with torch.no_grad():
            nn.init.uniform_(self.tokens, -bound, bound)
        learnable = config.scale in ("scale", "scale_channel")
        init = config.scale_init if config.scale_init is not None else (0.0 if learnable else None)
        self.scale = Scale(config.scale, site.out_features, init, **factory)

    @classmethod
    def parameter_count(cls, config: ResPromptConfig, sites: list[Site]) -> int:
        return sum(config.length * s.in_features + scale_count(config.scale, s.out_features) for s in sites)

    @property
    def starts_at_pretrained(self) -> bool:
        config: ResPromptConfig = self.config  # a learnable s starts at 0 unless scale_init says otherwise
        return config.scale in ("scale", "scale_channel") and not config.scale_init

    def keys_values(self, attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return frozen_projection(attention, 1, self.tokens), frozen_projection(attention, 2, self.tokens)


register_tuner("res_prompt", ResPromptConfig, ResPrompt)
register_preset("res_prompt", lambda: TuneSpec([ResPromptConfig()]))  # 92,172 on ViT-B/16
