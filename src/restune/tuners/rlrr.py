"""RLRR: Residual-based Low-Rank Rescaling (Dong et al., CVPR 2024, arXiv 2403.19067; zstarN70/RLRR).

Every frozen linear of every block is rescaled element-wise by a rank-1 matrix around the identity and its bias is
shifted: W'_pt = W_pt ⊙ (1 + s_out s_inᵀ), b' = b + f (PyTorch (out, in) layout; docs/methods/rlrr.md). The LayerNorm
outputs and the patch tokens get SSF scale/shift pairs, reused from ``restune.tuners.ssf``; the ``rlrr`` preset
combines both. Everything merges exactly into the frozen weights (docs/methods/rlrr.md).
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
from restune.sites import LINEAR, Site
from restune.spec import TuneSpec
from restune.tuners.ssf import SSFConfig

__all__ = [
    "RLRRConfig",
    "RLRRLinear",
    "RLRR_SITES",
    "RLRR_FUSED_SITES",
    "RLRR_SSF_SITES",
    "rlrr_spec",
]

# The six linears of every block with q, k, v split (docs/methods/README.md): the official code's separate linears.
RLRR_SITES = ["attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2"]
# The fused-qkv option: q, k, v as one D -> 3D linear (fewer parameters, no longer the papers' count).
RLRR_FUSED_SITES = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
# The SSF part of RLRR: after norm1, norm2, the final norm, and on the patch tokens before the class token is added.
RLRR_SSF_SITES = r"(blocks\.\d+\.(norm1|norm2)|norm|patch_embed)"
INITS = ("kaiming", "zero")


@dataclass
class RLRRConfig(TunerConfig):
    """RLRR options on linear sites; the defaults reproduce the official ``RLRRLinear``.

    Attributes:
        rank: r of the rescaling matrix S_out S_in (r = 1 is the paper's and the code's form; r > 1 is the paper's
            App. F generalisation).
        init: ``kaiming``: the official init, s_in ~ Kaiming-uniform(a = 0) with fan-in D_in, s_out ~
            Kaiming-uniform(a = 0) with fan-in r (U(-√6, √6) for r = 1), f = 0; the model does NOT start at the
            pretrained one. ``zero``: s_out = 0 and f = 0 (s_in stays Kaiming so that s_out gets a gradient), so the
            linears start exactly pretrained.
    """

    sites: str | list[str] = default_sites(RLRR_SITES)
    rank: int = 1
    init: str = "kaiming"

    def validate(self) -> None:
        positive_int(self, "rank")
        if self.init not in INITS:
            raise ValueError(f"{self.type}: 'init' must be one of {INITS}, got {self.init!r}")


class RLRRLinear(Tuner):
    """RLRR on one frozen linear: "Low-Rank Rescaled Vision Transformer Fine-Tuning: A Residual Design Approach".

    Paper: Dong, Zhang, Chen, Yan, Lin, Yan, Wang, Yang, CVPR 2024, arXiv 2403.19067 (official code zstarN70/RLRR,
    ``models/networks.py::RLRRLinear``).

    Formula (PyTorch layout W_pt (out, in)): W'_pt = W_pt ⊙ (1 + S_out S_in), b' = b + f, with S_in = ``scale_col``
    (r, D_in), S_out = ``scale_line`` (D_out, r) and f = ``shift_bias`` (D_out,). For r = 1 the stored shapes are
    the official ones, (1, D_in) and (D_out, 1). As a weight-delta tuner ``forward(x)`` returns only the added term
    s_out ⊙ ((x ⊙ s_in) W_ptᵀ) + f, computed with the frozen weight's view (the row block for q/k/v), never a copy.

    Attaches to: any linear site; the ``rlrr`` preset uses split q, k, v, ``attn.proj``, ``mlp.fc1`` and
    ``mlp.fc2`` of every block (plus SSF, see ``rlrr_spec``).

    Merges exactly: ``delta_weight() = W_pt ⊙ (S_out S_in)`` and ``delta_bias() = f``. Compute them before the
    frozen weight is overwritten, since the delta is a function of it.

    Count per site: r·D_in + r·D_out + D_out. ViT-B/16 with split q, k, v (r = 1): 20,736 per block, 248,832 in all;
    with the SSF pairs of the preset (12·4·768 + 2·2·768) 288,768 (docs/methods/rlrr.md). General formula for the
    preset: L·[Σ_linears (D_in + 2·D_out) + 4D] + 4D.

    Defaults vs the official code: ``scale_col``/``scale_line`` are ``kaiming_uniform_`` (a = 0) of the official
    shapes, so bounds √(6/D_in) and √6; ``shift_bias`` is zero. The official code evaluates W ⊙ s_in ⊙ s_out + W; the
    factored form here is the same value up to fp32 rounding.
    """

    binding = Binding.WEIGHT_DELTA
    site_kinds = frozenset({LINEAR})

    def __init__(self, config: RLRRConfig, site: Site) -> None:
        super().__init__(config, site)
        if site.kind != LINEAR:
            raise ValueError(f"{config.type}: {site.name} is a {site.kind} site; RLRR binds to linear sites")
        factory = {"device": site.device, "dtype": site.dtype}
        rank = config.rank
        self.scale_col = nn.Parameter(torch.empty(rank, site.in_features, **factory))
        self.scale_line = nn.Parameter(torch.empty(site.out_features, rank, **factory))
        self.shift_bias = nn.Parameter(torch.zeros(site.out_features, **factory))
        with torch.no_grad():
            # kaiming_uniform_(a=0) reads fan-in from the stored shape: D_in for scale_col, r for scale_line.
            nn.init.kaiming_uniform_(self.scale_col, a=0)
            if config.init == "zero":
                self.scale_line.zero_()
            else:
                nn.init.kaiming_uniform_(self.scale_line, a=0)
        # A plain reference (not a submodule), so the frozen linear is neither re-registered nor copied.
        self.__dict__["_frozen"] = site.module
        self.rows = site.rows

    @property
    def frozen_weight(self) -> torch.Tensor:
        """The site's frozen weight, (out, in): the row block of the fused qkv for q/k/v, a view in every case."""
        weight = self._frozen.weight
        return weight if self.rows is None else weight[self.rows[0] : self.rows[1]]

    @classmethod
    def parameter_count(cls, config: RLRRConfig, sites: list[Site]) -> int:
        return sum(config.rank * (s.in_features + s.out_features) + s.out_features for s in sites)

    @property
    def starts_at_pretrained(self) -> bool:
        return self.config.init == "zero"  # s_out = 0 and f = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.frozen_weight
        if self.scale_col.shape[0] == 1:
            # Rank 1: scale the input, one matmul with the frozen weight, scale the output. Its backward needs one
            # more matmul (for x's gradient), where the dense form W ⊙ ΔS needs two (x's and ΔW's).
            product = (x * self.scale_col[0]) @ weight.t()
            return product * self.scale_line[:, 0] + self.shift_bias
        # Rank r > 1: the factored form would need r matmuls; the dense delta needs one.
        return x @ self.delta_weight().t() + self.shift_bias

    def delta_weight(self) -> torch.Tensor:
        return self.frozen_weight * (self.scale_line @ self.scale_col)

    def delta_bias(self) -> torch.Tensor:
        return self.shift_bias

    def extra_repr(self) -> str:
        return f"site={self.site_name}, rank={self.scale_col.shape[0]}"


register_tuner("rlrr", RLRRConfig, RLRRLinear)


def rlrr_spec(
    *,
    init: str = "kaiming",
    rank: int = 1,
    fused_qkv: bool = False,
    ssf: bool = True,
) -> TuneSpec:
    """RLRR as in the paper, or one of the options in docs/methods/rlrr.md.

    Args:
        init: ``kaiming`` (official) or ``zero``; ``zero`` also starts the SSF pairs at the identity (γ = 1, β = 0),
            so the tuned model starts exactly as the pretrained one.
        rank: r of the rescaling (App. F); 1 is the default.
        fused_qkv: treat qkv as one D -> 3D linear (270,336 parameters on ViT-B/16 instead of 288,768).
        ssf: include the SSF pairs on norm1, norm2, the final norm and the patch tokens (without: 248,832).

    Returns:
        A spec that also trains the head. ``restune.tune`` keeps the head's values; the paper recipe zeroes it.
    """
    tuners: list[TunerConfig] = [RLRRConfig(sites=RLRR_FUSED_SITES if fused_qkv else RLRR_SITES, rank=rank, init=init)]
    if ssf:
        tuners.append(SSFConfig(sites=RLRR_SSF_SITES, init_std=0.0 if init == "zero" else 0.02))
    return TuneSpec(tuners, head="train")


register_preset("rlrr", rlrr_spec)  # 288,768 trainable parameters without the head on ViT-B/16
