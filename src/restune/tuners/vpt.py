"""VPT (Visual Prompt Tuning, ECCV 2022; KMnP/vpt): learnable prompt tokens in the token sequence.

Shallow: p tokens go in after the class token before the first block and stay; deep: every tuned block gets its own
p tokens at those positions, replacing what the previous block made of them. The tokens carry no position embedding,
the head still reads the class token, and the final ``norm``'s output loses them again so ``forward_features`` keeps
its usual shape (docs/methods/baselines.md). A token binding: see ``restune.binding.TokenHost``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from restune.contract import Binding, Tuner, TunerConfig, default_sites, positive_int, register_preset, register_tuner
from restune.sites import BLOCK, Site
from restune.spec import TuneSpec

__all__ = ["VPTConfig", "VPT"]


@dataclass
class VPTConfig(TunerConfig):
    """VPT options.

    Attributes:
        length: prompt tokens p per tuned block (the VPT paper tunes it per task; 50 is the library default).
        dropout: dropout on the prompt tokens (VPT's option; 0 by default).

    The first matched block inserts its tokens and every later matched block replaces them, so ``layers=[0]`` is
    VPT-shallow and all blocks VPT-deep.
    """

    sites: str | list[str] = default_sites(r"blocks\.\d+")
    length: int = 50
    dropout: float = 0.0

    def validate(self) -> None:
        positive_int(self, "length")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{self.type}: 'dropout' must be in [0, 1), got {self.dropout!r}")


class VPT(Tuner):
    """The prompt tokens of one block.

    Count per block: p*D (38,400 at p = 50, D = 768). Init: U(-v, v) with v = sqrt(6 / (3 * patch^2 + D)), VPT's
    Xavier-style bound over the patch embedding's fan-in (0.0625 for ViT-B/16). Not mergeable; does not start at the
    pretrained model (the tokens take attention mass).
    """

    binding = Binding.TOKENS
    site_kinds = frozenset({BLOCK})
    mixes_tokens = True

    def __init__(self, config: VPTConfig, site: Site) -> None:
        super().__init__(config, site)
        if site.patch_size is None:
            raise ValueError(f"{config.type}: {site.name} belongs to a model without a patch embedding")
        bound = math.sqrt(6.0 / (3 * site.patch_size**2 + site.in_features))
        self.prompts = nn.Parameter(torch.empty(config.length, site.in_features, device=site.device, dtype=site.dtype))
        with torch.no_grad():
            nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = nn.Dropout(config.dropout)
        self.length = config.length

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        problems = []
        if getattr(model, "cls_token", None) is None:
            problems.append("no class token")
        if getattr(model, "global_pool", None) != "token":
            problems.append(f"global_pool={getattr(model, 'global_pool', None)!r}")
        if getattr(model, "attn_pool", None) is not None:
            problems.append("an attention-pooling head")
        if not all(hasattr(model, name) for name in ("blocks", "norm", "num_prefix_tokens")):
            problems.append("no blocks/norm/num_prefix_tokens (not a timm VisionTransformer)")
        if problems:
            raise ValueError(
                f"vpt needs a timm VisionTransformer with a class token and token pooling, the VPT paper's setting; "
                f"this {type(model).__name__} has {', '.join(problems)}. Create the model with class_token=True and "
                "global_pool='token', or choose another tuner."
            )

    @classmethod
    def parameter_count(cls, config: VPTConfig, sites: list[Site]) -> int:
        return sum(config.length * s.in_features for s in sites)

    @property
    def added_tokens(self) -> int:
        return self.length

    def forward(self, batch: int) -> torch.Tensor:
        return self.dropout(self.prompts.expand(batch, -1, -1))

    def extra_repr(self) -> str:
        return f"site={self.site_name}, length={self.length}"


register_tuner("vpt", VPTConfig, VPT)

register_preset("vpt_shallow", lambda: TuneSpec([VPTConfig(layers=[0])]))  # 38,400 on ViT-B/16
register_preset("vpt_deep", lambda: TuneSpec([VPTConfig()]))  # 460,800
