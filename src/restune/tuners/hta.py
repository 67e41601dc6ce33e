"""HTA: Householder Transformation-based Adaptor (Dong et al., NeurIPS 2024, arXiv 2410.22952).

An SVD-shaped weight delta: two single-vector Householder matrices around a learnable diagonal, plus a rank-D'
product, added to a frozen linear (paper Eq. 6, row-vector layout y = x W + b):

    ΔW = W_down W_up + H(v_l) diag(d) H(v_r),     H(v) = I − v vᵀ   (paper form; I − 2 v vᵀ/‖v‖² as an option)

There is no public official code and no parity fixture (docs/methods/hta.md), so the paper's equations and parameter
counts are the reference; the initialisation, the dropout position and the rectangular generalisation are the
library's choices, stated in the spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from restune.contract import Binding, Tuner, TunerConfig, default_sites, register_preset, register_tuner
from restune.sites import LINEAR, Site
from restune.spec import TuneSpec

__all__ = ["HTAConfig", "HTA", "HTA_SITES", "HTA_STYLES", "hta_count"]

# The four square D x D weights of every block (docs/methods/hta.md): split q, k, v of the fused qkv, and W_o.
HTA_SITES = ["attn.q", "attn.k", "attn.v", "attn.proj"]
HTA_STYLES = ("lora", "adapter")


@dataclass
class HTAConfig(TunerConfig):
    """HTA options; the defaults are the ``hta`` preset (docs/methods/hta.md).

    Target sets are chosen with ``sites`` (list entries match dotted suffixes): any subset of ``attn.q``,
    ``attn.k``, ``attn.v``, ``attn.proj`` (W_o), ``mlp.fc1``, ``mlp.fc2`` (rectangular weights use the spec's
    rectangular generalisation, §4), or ``attn.qkv`` for the fused-qkv mode (one 768 -> 2304 rectangular HTA).

    Attributes:
        rank: D', the rank of the additive W_down W_up term; 0 drops it (the paper's D' ablation).
        normalized: use the true Householder reflector I − 2 v vᵀ/‖v‖² instead of the paper's I − v vᵀ.
        style: ``lora`` adds x ΔW to the linear's output (paper Eq. 6); ``adapter`` adds o ΔW_A to its output o
            (paper Eq. 7, put it on ``attn.proj`` for the MHA output and ``mlp.fc2`` for the FFN output).
        dropout: dropout on the input of the ΔW branch (x for ``lora``, o for ``adapter``); the paper tunes an
            "adapter dropout" without saying where it acts (docs/methods/hta.md).
    """

    sites: str | list[str] = default_sites(HTA_SITES)
    rank: int = 1
    normalized: bool = False
    style: str = "lora"
    dropout: float = 0.0

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"{self.type}: 'rank' (D') must be an integer >= 0, got {self.rank!r}")
        if not isinstance(self.normalized, bool):
            raise ValueError(f"{self.type}: 'normalized' must be true or false, got {self.normalized!r}")
        if self.style not in HTA_STYLES:
            raise ValueError(f"{self.type}: 'style' must be one of {HTA_STYLES}, got {self.style!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"{self.type}: 'dropout' must be in [0, 1), got {self.dropout!r}")


def hta_count(in_features: int, out_features: int, rank: int = 1, style: str = "lora") -> int:
    """Trainable parameters of one HTA tuner (docs/methods/hta.md).

    LoRA style on a D_in -> D_out linear: D_in + D_out + min(D_in, D_out) + D'(D_in + D_out) (5 D for D' = 1 and a
    square weight). Adapter style acts on the D_out-wide output: 3 D_out + 2 D' D_out.
    """
    if style == "adapter":
        in_features = out_features
    return in_features + out_features + min(in_features, out_features) + rank * (in_features + out_features)


def _reflect(t: torch.Tensor, v: torch.Tensor, normalized: bool) -> torch.Tensor:
    """Row vectors t times H(v), in O(N·D): t − c (t v) vᵀ with c = 1 (paper) or 2/‖v‖² (true reflector).

    H(v) is symmetric, so the same function applies H from the left to the columns of a matrix given transposed.
    """
    coeff = t @ v
    if normalized:
        coeff = coeff * (2.0 / (v @ v).clamp_min(torch.finfo(v.dtype).tiny))
    return t - coeff.unsqueeze(-1) * v


class HTA(Tuner):
    """Householder Transformation-based Adaptor (HTA), Dong et al., NeurIPS 2024, arXiv 2410.22952.

    Formula (row-vector layout): y = x (W + ΔW) + b with ΔW = W_down W_up + H(v_l) diag(d) H(v_r) and
    H(v) = I − v vᵀ as the paper writes it (``normalized=True``: I − 2 v vᵀ/‖v‖²). ``forward(x)`` returns only the
    added term, through the factorised O(N·D) form t = x H(v_l), t = t ⊙ d, g = t H(v_r), plus (x W_down) W_up; no
    D x D matrix is formed in training. For a rectangular D_in x D_out weight, d has min(D_in, D_out) entries acting on
    the first columns of t, which is then zero-padded (or truncated) to D_out before H(v_r).
    Adapter style (paper Eq. 7): o' = o + o ΔW_A on the output o = x W + b of the frozen linear, ΔW_A D_out x D_out;
    o is recomputed here from the frozen ``site.weight``/``site.bias`` views (never copied), since a weight-delta
    tuner sees the linear's input, so this style costs one extra matmul of the frozen linear.

    Attaches to linear sites: by default the split q, k, v row blocks of every ``attn.qkv`` and every ``attn.proj``
    (the four D x D weights of a block, inferred from the paper's counts, docs/methods/hta.md).

    Merges exactly: ``delta_weight()`` is ΔWᵀ in PyTorch (out, in) layout (of the site's rows for q/k/v), formed in
    at least fp32; ``delta_bias()`` is None. Adapter style folds as W_o ← W_o (I + ΔW_A), b_o ← b_o (I + ΔW_A):
    ``delta_weight() = ΔW_Aᵀ W_pt`` and ``delta_bias() = ΔW_Aᵀ b``.

    Count per site (LoRA style): D_in + D_out + min(D_in, D_out) + D'·(D_in + D_out), i.e. 5 D for D' = 1 on a D x D
    weight; ``hta`` preset on ViT-B/16: 12 x 4 x 3,840 = 184,320 (L · 4 · 5 D in general: ViT-S 92,160, ViT-L
    491,520). Adapter style: 3 D_out + 2 D'·D_out per site.

    Defaults vs the official code: none is public. The defaults follow the paper (H(v) = I − v vᵀ, D' = 1, q/k/v/o)
    and the library's initialisation (docs/methods/hta.md): d = 0 and W_up = 0, so ΔW = 0 and the tuned model starts as
    the pretrained one; v_l ~ N(0, 1/D_in), v_r ~ N(0, 1/D_out); W_down Kaiming-uniform(√5) on its stored (D', D_in)
    shape (bound 1/√D_in). Stored shapes: ``v_l`` (D_in,), ``v_r`` (D_out,), ``d`` (min(D_in, D_out),), ``w_down``
    (D', D_in), ``w_up`` (D_out, D'), so (x W_down) W_up = x w_downᵀ w_upᵀ.
    """

    binding = Binding.WEIGHT_DELTA
    site_kinds = frozenset({LINEAR})

    def __init__(self, config: HTAConfig, site: Site) -> None:
        super().__init__(config, site)
        self.style = config.style
        self.normalized = config.normalized
        # Adapter style reads the frozen linear at run time; the Site (not a Module) holds a reference, never a copy.
        self._site = site
        factory = {"device": site.device, "dtype": site.dtype}
        d_in = site.out_features if config.style == "adapter" else site.in_features
        d_out = site.out_features
        self.in_features, self.out_features = d_in, d_out
        self.v_l = nn.Parameter(torch.empty(d_in, **factory))
        self.v_r = nn.Parameter(torch.empty(d_out, **factory))
        self.d = nn.Parameter(torch.zeros(min(d_in, d_out), **factory))
        with torch.no_grad():
            nn.init.normal_(self.v_l, mean=0.0, std=1.0 / math.sqrt(d_in))
            nn.init.normal_(self.v_r, mean=0.0, std=1.0 / math.sqrt(d_out))
        if config.rank > 0:
            self.w_down = nn.Parameter(torch.empty(config.rank, d_in, **factory))
            self.w_up = nn.Parameter(torch.zeros(d_out, config.rank, **factory))
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.w_down, a=math.sqrt(5))
        else:
            self.register_parameter("w_down", None)
            self.register_parameter("w_up", None)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @classmethod
    def parameter_count(cls, config: HTAConfig, sites: list[Site]) -> int:
        return sum(hta_count(s.in_features, s.out_features, config.rank, config.style) for s in sites)

    @property
    def starts_at_pretrained(self) -> bool:
        return True  # d = 0 and W_up = 0

    def hta(self, x: torch.Tensor) -> torch.Tensor:
        """The added term x ΔW for row vectors x (..., D_in), through the factorised form."""
        t = _reflect(x, self.v_l, self.normalized)
        t = t[..., : self.d.shape[0]] * self.d
        if t.shape[-1] < self.out_features:
            t = F.pad(t, (0, self.out_features - t.shape[-1]))
        out = _reflect(t, self.v_r, self.normalized)
        if self.w_down is not None:
            out = out + (x @ self.w_down.t()) @ self.w_up.t()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "adapter":
            x = F.linear(x, self._site.weight, self._site.bias)
        return self.hta(self.dropout(x))

    def _delta_matrix(self) -> torch.Tensor:
        """ΔW in paper layout (D_in, D_out), in at least fp32, via rank-1 updates (equal to forming both H)."""
        dtype = torch.promote_types(self.d.dtype, torch.float32)
        v_l, v_r, d = self.v_l.to(dtype), self.v_r.to(dtype), self.d.to(dtype)
        middle = torch.zeros(self.in_features, self.out_features, device=d.device, dtype=dtype)
        middle[: d.shape[0], : d.shape[0]] = torch.diag(d)
        delta = _reflect(_reflect(middle.t(), v_l, self.normalized).t(), v_r, self.normalized)
        if self.w_down is not None:
            delta = delta + self.w_down.to(dtype).t() @ self.w_up.to(dtype).t()
        return delta

    def delta_weight(self) -> torch.Tensor:
        delta = self._delta_matrix().t()
        if self.style == "adapter":
            delta = delta @ self._site.weight.to(delta.dtype)
        return delta.contiguous()

    def delta_bias(self) -> torch.Tensor | None:
        bias = self._site.bias
        if self.style != "adapter" or bias is None:
            return None
        delta = self._delta_matrix()
        return bias.to(delta.dtype) @ delta

    def extra_repr(self) -> str:
        reflector = "I-2vv^T/|v|^2" if self.normalized else "I-vv^T"
        rank = 0 if self.w_down is None else self.w_down.shape[0]
        return (
            f"site={self.site_name}, style={self.style}, {self.in_features}->{self.out_features}, "
            f"rank={rank}, H={reflector}"
        )


register_tuner("hta", HTAConfig, HTA)

register_preset("hta", lambda: TuneSpec([HTAConfig()], head="train"))  # 184,320 on ViT-B/16
