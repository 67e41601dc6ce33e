"""Classic prefix tuning on ViTs: learnable keys and values concatenated in front of every attention's own.

O_h = softmax(Q_h [K^_h; K_h]^T / sqrt(d_h)) [V^_h; V_h] with K^, V^ (l, D) split per head like the backbone, no
re-parameterisation MLP (docs/methods/baselines.md). The bound counterpart of Res-Prefix: here the prefix shares the
backbone's softmax, so the tuned model cannot start exactly at the pretrained one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from restune.contract import TunerConfig, default_sites, positive_int, register_preset, register_tuner
from restune.sites import Site
from restune.spec import TuneSpec
from restune.tuners.prefix import AttentionBranchTuner, attention_width

__all__ = ["PrefixTuningConfig", "PrefixTuning"]


@dataclass
class PrefixTuningConfig(TunerConfig):
    """Prefix tuning options.

    Attributes:
        length: prefix keys/values l per attention.
    """

    sites: str | list[str] = default_sites(r"blocks\.\d+\.attn")
    length: int = 10

    def validate(self) -> None:
        positive_int(self, "length")


class PrefixTuning(AttentionBranchTuner):
    """Prefix keys and values of one attention.

    Count per block: 2*l*D; 184,320 for the ``prefix`` preset (l = 10) on ViT-B/16. Init: K^ and V^ Xavier-uniform on
    (l, D). Not mergeable. The binding recomputes the attention with the joined keys (``AttentionHost``), so the
    backbone's own attention result is discarded: about one extra attention per block.
    """

    joins_softmax = True

    def __init__(self, config: PrefixTuningConfig, site: Site) -> None:
        super().__init__(config, site)
        attention = site.attention
        if getattr(attention, "gate", None) is not None:
            raise ValueError(f"{config.type}: {site.name} is a gated attention; prefix tuning supports plain ones")
        factory = {"device": site.device, "dtype": site.dtype}
        width = attention_width(site)
        self.keys = nn.Parameter(torch.empty(config.length, width, **factory))
        self.values = nn.Parameter(torch.empty(config.length, width, **factory))
        with torch.no_grad():
            nn.init.xavier_uniform_(self.keys)
            nn.init.xavier_uniform_(self.values)

    @classmethod
    def parameter_count(cls, config: PrefixTuningConfig, sites: list[Site]) -> int:
        return sum(2 * config.length * attention_width(s) for s in sites)

    def keys_values(self, attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values


register_tuner("prefix", PrefixTuningConfig, PrefixTuning)

register_preset("prefix", lambda: TuneSpec([PrefixTuningConfig()]))  # 184,320 on ViT-B/16
