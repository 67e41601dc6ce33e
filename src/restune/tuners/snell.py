"""SNELL: sparse tuning with kernelized LoRA (Shen et al., NeurIPS 2024, arXiv 2411.01800; ssfgunner/SNELL).

A weight delta on every linear, built from low-rank factors through a non-linear kernel so its rank can exceed r, then
sparsified by competition (only the largest-magnitude entries survive). The delta is recomputed under activation
checkpointing, so the dense D_in x D_out matrix is never kept for backward: the optimiser and the autograd graph hold
only the factors, which is the paper's memory argument (docs/methods/snell.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

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

__all__ = [
    "SnellConfig",
    "Snell",
    "SnellDelta",
    "SNELL_SITES",
    "kernel_delta",
    "linear_quantile",
    "sparsify",
]

SNELL_SITES = ["attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2"]
SPARSIFIERS = ("code", "paper")


def default_coefficients(chunks: int, magnitude: float = 0.1) -> list[float]:
    """The official kernel weights c_p = 0.1 * (-1)^(p-1): (+0.1, -0.1) for the default two chunks."""
    return [magnitude * (-1.0) ** p for p in range(chunks)]


@dataclass
class SnellConfig(TunerConfig):
    """SNELL options; defaults reproduce the official code with the released rank-32 scripts (preset ``snell``).

    Attributes:
        r: rank of the factors (official ``low_rank_dim``; the released VTAB scripts use 32).
        chunks: P, the number of chunks each r-dim factor row is split into (official ``num_Hs`` = 2).
        sparsity: s, the fraction of delta entries ZEROED (official ``init_thres``); 0 gives plain kernelized LoRA.
            It is a per-task setting of the recipe (docs/methods/snell.md); the official command-line default is 0.
        sparsifier: ``code`` (official: keep |dW| > quantile(|dW|, s), multiply by the detached |dW|) or ``paper``
            (Eq. 5: dW * max(|dW| - t, 0) with t the ceil(s*n)-th smallest |dW|, treated as a constant).
        kernel_coeff: the kernel weights c_p, one per chunk; None gives the official (+0.1, -0.1, +0.1, ...).
        learn_coeff: train the kernel weights (the paper's reading); the official code keeps them fixed.
        norm_p: the p of the distance kernel (official ``norm_p`` = 2, Euclidean).
        dropout: Dropout on the branch input (official 0.1; ``--no_drop_out`` sets 0). The q, k and v branches of one
            fused qkv share one mask, as the official attention applies one Dropout before its three branches.
        dropout_skip: sites (dotted suffixes) whose branch input gets no dropout: the official proj branch reads the
            attention output undropped.
        drop_path: per-sample DropPath on each branch output (official 0.1; ``--no_drop_path`` sets 0).
        checkpoint: recompute the delta in backward (non-reentrant activation checkpointing) instead of storing it.
    """

    sites: str | list[str] = default_sites(SNELL_SITES)
    r: int = 32
    chunks: int = 2
    sparsity: float = 0.0
    sparsifier: str = "code"
    kernel_coeff: list[float] | None = None
    learn_coeff: bool = False
    norm_p: float = 2.0
    dropout: float = 0.1
    dropout_skip: list[str] = field(default_factory=lambda: ["attn.proj"])
    drop_path: float = 0.1
    checkpoint: bool = True

    def validate(self) -> None:
        positive_int(self, "r")
        positive_int(self, "chunks")
        if self.r % self.chunks:
            raise ValueError(f"{self.type}: 'r' ({self.r}) must be divisible by 'chunks' ({self.chunks})")
        if isinstance(self.sparsity, bool) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(
                f"{self.type}: 'sparsity' (fraction of entries zeroed) must be in [0, 1), got {self.sparsity!r}"
            )
        if self.sparsifier not in SPARSIFIERS:
            raise ValueError(f"{self.type}: 'sparsifier' must be one of {SPARSIFIERS}, got {self.sparsifier!r}")
        if self.kernel_coeff is not None:
            self.kernel_coeff = [float(c) for c in self.kernel_coeff]
            if len(self.kernel_coeff) != self.chunks:
                raise ValueError(
                    f"{self.type}: 'kernel_coeff' needs one weight per chunk ({self.chunks}), got {self.kernel_coeff!r}"
                )
        if not self.norm_p > 0:
            raise ValueError(f"{self.type}: 'norm_p' must be positive, got {self.norm_p!r}")
        for name in ("dropout", "drop_path"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{self.type}: '{name}' must be in [0, 1), got {value!r}")
        if isinstance(self.dropout_skip, str):
            self.dropout_skip = [self.dropout_skip]
        self.dropout_skip = list(self.dropout_skip)

    @property
    def coefficients(self) -> list[float]:
        return list(self.kernel_coeff) if self.kernel_coeff is not None else default_coefficients(self.chunks)


# ---------------------------------------------------------------------------------------------------------------
# The math, as plain functions (paper layout: dW is (D_in, D_out)).
# ---------------------------------------------------------------------------------------------------------------


def kernel_delta(
    in_factors: torch.Tensor, out_factors: torch.Tensor, coeff: torch.Tensor, p: float = 2.0
) -> torch.Tensor:
    """dW[i, j] = sum_h c_h ||a[h, i] - b[h, j]||_p, shape (D_in, D_out).

    ``torch.cdist`` is what the official code uses; for more than 25 rows it takes the matrix-product form of the
    Euclidean distance, so no (D_in, D_out, r/P) difference tensor is ever formed.
    """
    distances = torch.cdist(in_factors, out_factors, p=p)  # (P, D_in, D_out)
    return (coeff.to(distances.dtype).view(-1, 1, 1) * distances).sum(0)


def _order_statistics(flat: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The lo-th and hi-th smallest entries (0-based) of a 1-D tensor, as 0-d tensors.

    ``torch.kthvalue`` is O(n) on the CPU; on CUDA it runs one thread block per slice, so for one large slice a
    full (multi-block radix) sort is far faster there: on an H200, 0.2 ms instead of 25 ms for a 768 x 3072 matrix,
    and a ViT-B/16 ``snell`` training step at batch 64 took 207 ms instead of 1,725 ms.
    """
    if flat.device.type == "cpu":
        below = torch.kthvalue(flat, lo + 1).values
        return below, below if hi == lo else torch.kthvalue(flat, hi + 1).values
    ordered = torch.sort(flat).values
    return ordered[lo], ordered[hi]


def linear_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of all entries with linear interpolation, for any number of entries.

    Equals ``numpy.quantile(values, q, method="linear")`` for a Python-float q (computed in the input dtype, as
    numpy does): position q * (n - 1) in float64, the two order statistics around it by selection, and numpy's
    two-sided interpolation. It has no size limit (``torch.quantile`` of some PyTorch releases, 2.11 for one,
    refuses more than 2^24 entries, which large layers exceed). ``torch.quantile`` forms the position in the input
    dtype, so for fp32 the two can differ in the last bit of the threshold.
    """
    flat = values.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("linear_quantile: no values")
    position = (n - 1) * float(q)
    lo = min(max(math.floor(position), 0), n - 1)
    hi = min(lo + 1, n - 1)
    gamma = position - math.floor(position)
    if gamma == 0.0:  # numpy's below + (above - below) * 0, without the second order statistic
        hi = lo
    below, above = _order_statistics(flat, lo, hi)
    diff = above - below
    if gamma < 0.5:
        return below + diff * gamma
    return above - diff * (1.0 - gamma)


class SnellDelta(NamedTuple):
    """Every stage of the delta, paper layout (D_in, D_out): what the parity fixtures store."""

    delta: torch.Tensor  # dW_s, the delta actually applied
    dense: torch.Tensor  # dW before sparsification
    threshold: torch.Tensor | None  # t, a 0-d tensor (None when s = 0)
    mask: torch.Tensor | None  # bool, True where an entry survives (None when s = 0)


def sparsify(dense: torch.Tensor, sparsity: float, sparsifier: str = "code") -> SnellDelta:
    """Competition-based sparsification of a dense delta.

    ``code`` (official): t = quantile(|dW|, s); dW_s = dW * sg(|dW|) * 1[|dW| > t]. The magnitude is detached and
    the threshold not subtracted, so survivors carry sign(dW) dW^2 forward and |dW| * grad backward. s = 0: dW_s = dW.
    ``paper`` (Eq. 5): t = the ceil(s*n)-th smallest |dW| (0 when that is the 0th); dW_s = dW * max(|dW| - sg(t), 0).
    """
    if sparsifier == "code":
        if sparsity == 0:
            return SnellDelta(dense, dense, None, None)
        magnitude = dense.detach().abs()
        threshold = linear_quantile(magnitude, sparsity)
        mask = magnitude > threshold
        return SnellDelta(dense * (magnitude * mask), dense, threshold, mask)
    if sparsifier == "paper":
        magnitude = dense.abs()
        k = math.ceil(sparsity * magnitude.numel())
        flat = magnitude.detach().reshape(-1)
        threshold = _order_statistics(flat, k - 1, k - 1)[0] if k > 0 else flat.new_zeros(())
        kept = torch.clamp(magnitude - threshold, min=0)
        return SnellDelta(dense * kept, dense, threshold, kept > 0)
    raise ValueError(f"unknown sparsifier {sparsifier!r}; one of {SPARSIFIERS}")


# ---------------------------------------------------------------------------------------------------------------
# The tuner.
# ---------------------------------------------------------------------------------------------------------------


def _skips_dropout(config: SnellConfig, site: Site) -> bool:
    return any(site.name == name or site.name.endswith("." + name) for name in config.dropout_skip)


class Snell(Tuner):
    """SNELL: kernelized LoRA plus competition-based sparsification on one linear.

    Paper: "Expanding Sparse Tuning for Low Memory Usage", Shen, Sun, Ji, Huang, Wang, NeurIPS 2024, arXiv 2411.01800.

    Formula (paper layout, y = x W + b):
        dW[i, j] = sum_p c_p ||A^p_i - B^p_j||_2           A^p (D_in, r/P), B^p (D_out, r/P), c = (+0.1, -0.1) fixed
        t = quantile(|dW|, s),  dW_s = dW * sg(|dW|) * 1[|dW| > t]      (s = 0: dW_s = dW)
        y = x W + b + DropPath(Dropout(x) dW_s)

    Attaches in parallel to linear sites, by default split q, k, v, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` of every
    block (72 branches on ViT-B/16); ``forward(x)`` returns the branch, which the host adds to the site's output (a
    q/k/v branch to its row block of the fused qkv). The branch runs under non-reentrant activation checkpointing, so
    the factors get gradients even when nothing upstream requires grad. Mergeable: ``delta_weight()`` is dW_s^T in
    PyTorch (out, in) layout, deterministic (dropout and drop-path only act in training).

    Count per site: r * (D_in + D_out) (+ P with ``learn_coeff``). Per ViT block with the default sites:
    [4 * 2D + (D + 4D) + (4D + D)] r = 18 D r, i.e. 13,824 r on ViT-B/16; the presets add the class token (D), so
    ``snell`` (r = 32) has 12 * 13,824 * 32 + 768 = 5,309,184, ``snell_16`` 2,654,976 and ``snell_8`` 1,327,872.

    Official code mapping: ``in_factors`` (P, D_in, r/P) is ``In_Qs``, ``out_factors`` (P, D_out, r/P) is ``Out_Qs``,
    both Kaiming-uniform(sqrt 5) on the 3-D tensor (fan_in = D * r/P), so dW is small but not zero at init; the
    buffer ``kernel_coeff`` is the frozen ``shared_coeff_fc``; ``sparsity`` is ``init_thres``; distances use
    ``torch.cdist`` as there; dropout/drop-path 0.1 as in ``AttentionSNELLParallel`` / ``MlpSNELLParallel``. The
    backbone's own stochastic depth (0.1 in the recipes) is a property of the timm model, not of this tuner.
    """

    binding = Binding.WEIGHT_DELTA
    site_kinds = frozenset({LINEAR})

    def __init__(self, config: SnellConfig, site: Site, shared_dropout: nn.Dropout | None = None) -> None:
        super().__init__(config, site)
        factory = {"device": site.device, "dtype": site.dtype}
        width = config.r // config.chunks
        self.in_factors = nn.Parameter(torch.empty(config.chunks, site.in_features, width, **factory))
        self.out_factors = nn.Parameter(torch.empty(config.chunks, site.out_features, width, **factory))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.in_factors, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.out_factors, a=math.sqrt(5))
        coeff = torch.tensor(config.coefficients, **factory)
        if config.learn_coeff:
            self.kernel_coeff = nn.Parameter(coeff)
        else:
            self.register_buffer("kernel_coeff", coeff)
        p = 0.0 if _skips_dropout(config, site) else config.dropout
        if p > 0:
            self.input_dropout = shared_dropout if shared_dropout is not None else nn.Dropout(p)
        else:
            self.input_dropout = None
        self.drop_path = DropPath(config.drop_path) if config.drop_path > 0 else nn.Identity()

    @classmethod
    def build_all(cls, config: SnellConfig, sites: list[Site]) -> list[Tuner]:
        """One tuner per site; the q, k, v row blocks of one fused qkv share one Dropout, so one mask.

        The host applies a transform shared by several of its tuners once per forward (``input_transform``).
        """
        shared: dict[int, nn.Dropout] = {}
        tuners: list[Tuner] = []
        for site in sites:
            dropout = None
            if site.rows is not None and config.dropout > 0 and not _skips_dropout(config, site):
                dropout = shared.setdefault(id(site.module), nn.Dropout(config.dropout))
            tuners.append(cls(config, site, dropout))
        return tuners

    @classmethod
    def parameter_count(cls, config: SnellConfig, sites: list[Site]) -> int:
        coefficients = config.chunks if config.learn_coeff else 0
        return sum(config.r * (s.in_features + s.out_features) + coefficients for s in sites)

    @property
    def input_transform(self) -> nn.Module | None:
        return self.input_dropout

    def parts(self) -> SnellDelta:
        """Dense delta, threshold, mask and sparse delta, paper layout (D_in, D_out)."""
        config: SnellConfig = self.config
        dense = kernel_delta(self.in_factors, self.out_factors, self.kernel_coeff, config.norm_p)
        return sparsify(dense, config.sparsity, config.sparsifier)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.parts().delta.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The branch for an input the host has already passed through ``input_transform`` (the dropout)."""
        if self.config.checkpoint and torch.is_grad_enabled():
            out = checkpoint(self._branch, x, use_reentrant=False, preserve_rng_state=False)
        else:
            out = self._branch(x)
        return self.drop_path(out)

    def delta_weight(self) -> torch.Tensor:
        return self.parts().delta.t()

    def extra_repr(self) -> str:
        c: SnellConfig = self.config
        return f"site={self.site_name}, r={c.r}, chunks={c.chunks}, sparsity={c.sparsity}, sparsifier={c.sparsifier}"


register_tuner("snell", SnellConfig, Snell)


def _preset(r: int) -> Callable[[], TuneSpec]:
    return lambda: TuneSpec([SnellConfig(r=r)], head="train", train=["cls_token"])


# No head, ViT-B/16. s stays 0 here (official default); the recipe sets it per task (docs/methods/snell.md).
register_preset("snell_8", _preset(8))  # 1,327,872
register_preset("snell_16", _preset(16))  # 2,654,976
register_preset("snell_32", _preset(32))  # 5,309,184
register_preset("snell", _preset(32))  # alias of snell_32
