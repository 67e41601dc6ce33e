"""ARC (Adapter Re-Composing, arXiv 2310.06234): symmetric linear adapters whose projection is shared by all blocks.

One affine map per (block, position) applied to the input of ``blocks.i.attn`` and ``blocks.i.mlp`` (after the
pre-LN, before the frozen sub-layer): A(h) = h + Dropout(h (U diag(c))) U^T + b. One U per position is shared by
every block, so almost all of ARC's parameters are the two D x r matrices. A is affine and feeds only the sub-layer,
so it folds exactly into the following frozen linear (``qkv`` or ``fc1``). Spec: docs/methods/arc.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from restune.contract import (
    Binding,
    FoldPlan,
    Tuner,
    TunerConfig,
    default_sites,
    positive_int,
    register_preset,
    register_tuner,
)
from restune.sites import ATTN, MLP, Site
from restune.spec import TuneSpec

__all__ = ["ARCConfig", "ARCAdapter", "ARC_SITES", "ARC_ATT_SITES"]

ARC_SITES = r"blocks\.\d+\.(attn|mlp)"
ARC_ATT_SITES = r"blocks\.\d+\.attn"
RESCALE_INITS = ("zero", "xavier")
# The frozen linear right after the adapter, by site kind: where the adapter folds to on merge.
FOLD_TARGETS = {ATTN: "qkv", MLP: "fc1"}


@dataclass
class ARCConfig(TunerConfig):
    """ARC options; defaults are the official ``Model/ARC_ViT.py`` (``tuning_mode='ARC'``, ``adapter_dim=50``).

    One config covers both positions: its matched ``attn`` sites share one U_att and its matched ``mlp`` sites one
    U_mlp (``ARCAdapter.build_all``), so ``arc`` is a single config and ``arc_att`` is the same config restricted to
    ``attn`` sites. Two separate configs never share a U.

    Attributes:
        r: bottleneck width (official ``adapter_dim``).
        dropout: dropout on the r-dim bottleneck in training (official ``adapter_dropout``, VTAB ``--adapt_drop``).
        attn_rescale_init: c at the attention position: ``zero`` (official; the adapter starts as the identity) or
            ``xavier`` (Xavier-uniform on the official (1, r) shape, bound sqrt(6 / (1 + r))).
        mlp_rescale_init: c at the MLP position: ``xavier`` (official, so the MLP adapters are not the identity at
            init) or ``zero`` (both positions start as the identity).
    """

    sites: str | list[str] = default_sites(ARC_SITES)
    r: int = 50
    dropout: float = 0.1
    attn_rescale_init: str = "zero"
    mlp_rescale_init: str = "xavier"

    def validate(self) -> None:
        positive_int(self, "r")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{self.type}: 'dropout' must be in [0, 1), got {self.dropout!r}")
        for name in ("attn_rescale_init", "mlp_rescale_init"):
            if getattr(self, name) not in RESCALE_INITS:
                raise ValueError(f"{self.type}: '{name}' must be one of {RESCALE_INITS}, got {getattr(self, name)!r}")


class ARCAdapter(Tuner):
    """ARC adapter on one ``attn`` or ``mlp`` site.

    Paper: Dong, Yan, Lin, Wang, "Efficient Adaptation of Large Vision Transformer via Adapter Re-Composing",
    NeurIPS 2023, arXiv 2310.06234.

    Formula: A(h) = h + Dropout(h (U diag(c))) U^T + b = h M + b in eval, M = I + U diag(c) U^T (symmetric, D x D),
    with U (D, r) shared by every site of the same kind bound by one config, and c (r,), b (D,) per site.
    Attaches ``before`` the site: it transforms the module's input (norm1's or norm2's output), so the block's
    residual still carries the un-adapted stream.

    Merge: exact in eval; ``fold_into`` gives the next frozen linear's (weight, bias) W_pt M^T, W_pt b + b_orig
    (``fold_target``: ``qkv`` for attn, ``fc1`` for mlp). ``delta_weight`` is not defined: the map changes the
    input, not a weight.

    Count per config: D * r for each position kind present (the shared U) + (r + D) per site. ViT-B/16, r = 50:
    ``arc`` = 2 * 768 * 50 + 12 * 2 * (50 + 768) = 96,432; ``arc_att`` = 768 * 50 + 12 * (50 + 768) = 48,216.

    Defaults vs ``Model/ARC_ViT.py``: U = ``att_down_projection`` / ``mlp_down_projection`` (stored (D, r), Xavier
    uniform); c = ``adapter_rescale`` (official (1, r), kept here as (r,)): zero at the attention position,
    Xavier-uniform on (1, r) at the MLP position; b = ``adapter_bias``, zero; dropout 0.1 on the bottleneck.
    Initialisation follows the official order (per block the attention adapter before the MLP adapter, then the
    shared U_mlp before U_att). The paper recipe's zero head is the training harness's business.
    """

    binding = Binding.AFFINE
    site_kinds = frozenset({ATTN, MLP})
    position = "before"
    fold_order = 2  # into the next linear, after that linear's own weight deltas (which read the adapted input)

    def __init__(self, config: ARCConfig, site: Site, shared_U: nn.Parameter | None = None) -> None:
        """Build the per-site c and b; ``shared_U`` is the position's shared U (None: a private, initialised U)."""
        super().__init__(config, site)
        factory = {"device": site.device, "dtype": site.dtype}
        self.kind = site.kind
        if shared_U is None:
            shared_U = _new_projection(site.in_features, config.r, **factory)
            _init_projection(shared_U)
        if tuple(shared_U.shape) != (site.in_features, config.r):
            raise ValueError(
                f"{config.type}: shared U of shape {tuple(shared_U.shape)} does not fit {site.name} "
                f"(width {site.in_features}, r = {config.r})"
            )
        self.U = shared_U
        self.rescale = nn.Parameter(torch.zeros(config.r, **factory))
        self.bias = nn.Parameter(torch.zeros(site.in_features, **factory))
        init = config.attn_rescale_init if site.kind == ATTN else config.mlp_rescale_init
        if init == "xavier":
            with torch.no_grad():
                nn.init.xavier_uniform_(self.rescale.view(1, -1))  # the official (1, r) shape sets the fans
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @classmethod
    def build_all(cls, config: ARCConfig, sites: list[Site]) -> list[Tuner]:
        """One adapter per site, all sites of one kind holding the same U Parameter (counted and saved once)."""
        shared: dict[str, nn.Parameter] = {}
        for site in sites:
            if site.kind not in shared:
                shared[site.kind] = _new_projection(site.in_features, config.r, device=site.device, dtype=site.dtype)
        tuners: list[Tuner] = [cls(config, site, shared[site.kind]) for site in sites]
        for kind in (MLP, ATTN):  # official order: the shared matrices after the layers, U_mlp before U_att
            if kind in shared:
                _init_projection(shared[kind])
        return tuners

    @classmethod
    def parameter_count(cls, config: ARCConfig, sites: list[Site]) -> int:
        shared = {s.kind: s.in_features * config.r for s in sites}
        return sum(shared.values()) + sum(config.r + s.in_features for s in sites)

    @property
    def starts_at_pretrained(self) -> bool:
        config: ARCConfig = self.config  # c = 0 (and b = 0) makes the adapter the identity map
        return (config.attn_rescale_init if self.kind == ATTN else config.mlp_rescale_init) == "zero"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(x @ (self.U * self.rescale))
        return x + (hidden @ self.U.t() + self.bias)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, b) with A(h) = h M + b in eval mode; M = I + U diag(c) U^T is (D, D) and symmetric."""
        eye = torch.eye(self.U.shape[0], device=self.U.device, dtype=self.U.dtype)
        return eye + (self.U * self.rescale) @ self.U.t(), self.bias

    def fold_target(self, site: Site) -> nn.Linear:
        """The frozen linear right after this adapter, which it folds into: ``qkv`` (attn site) or ``fc1`` (mlp)."""
        return getattr(site.module, FOLD_TARGETS[site.kind])

    def fold_into(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next linear's (weight, bias) with this adapter folded in, exact in eval mode.

        ``linear(A(h)) = h (W_pt M^T)^T + (W_pt b + b_orig)``, so the merged model drops the adapter. Computed in
        float64 and returned in ``weight``'s dtype and device, so the fold costs one rounding. Fold after any weight
        delta on the same linear (a delta there reads the adapted input).

        Args:
            weight: the linear's weight in PyTorch (out, in) layout, (out, D).
            bias: the linear's bias, or None; the returned bias is W_pt b alone then.

        Returns:
            (W_pt M^T, W_pt b + bias).
        """
        with torch.no_grad():
            w = weight.detach().to(torch.float64)
            matrix, shift = (t.detach().to(device=w.device, dtype=torch.float64) for t in self.affine())
            new_bias = w @ shift
            if bias is not None:
                new_bias = new_bias + bias.detach().to(device=w.device, dtype=torch.float64)
            return (w @ matrix.t()).to(weight.dtype), new_bias.to(weight.dtype)

    def fold(self, site: Site, plan: FoldPlan) -> None:
        """Fold into the frozen linear after this adapter (``fold_target``), exact in eval mode."""
        linear = self.fold_target(site)
        bias = plan.get(linear.bias) if linear.bias is not None else None
        weight, new_bias = self.fold_into(plan.get(linear.weight), bias)
        plan.set(linear.weight, weight)
        if linear.bias is not None:
            plan.set(linear.bias, new_bias)

    def extra_repr(self) -> str:
        return f"site={self.site_name}, r={self.rescale.numel()}, shared U {tuple(self.U.shape)}"


def _new_projection(width: int, r: int, *, device: torch.device, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(width, r, device=device, dtype=dtype))


def _init_projection(U: nn.Parameter) -> None:
    """Xavier-uniform on the stored (D, r) shape, bound sqrt(6 / (D + r)), as the official code."""
    with torch.no_grad():
        nn.init.xavier_uniform_(U)


register_tuner("arc", ARCConfig, ARCAdapter)

register_preset("arc", lambda: TuneSpec([ARCConfig()], head="train"))  # 96,432 on ViT-B/16
register_preset("arc_att", lambda: TuneSpec([ARCConfig(sites=ARC_ATT_SITES)], head="train"))  # 48,216
