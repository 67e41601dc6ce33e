"""The frozen operations of a timm vision transformer that a tuner can bind to.

A *site* is one frozen operation named by its dotted module path: a whole block, its attention or MLP, a linear
layer, a LayerNorm, the patch embedding, or one of the virtual row blocks ``q``, ``k``, ``v`` of a fused ``qkv``
linear. Sites are discovered structurally (what a module contains), not from a hard-coded list, so every ViT width
and depth that timm builds (ViT-S/B/L/H, DeiT, ...) works alike.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Site", "SiteMatchError", "find_sites", "match_sites", "STORE_ATTR"]

# Attribute under which restune keeps its tuners on a model; nothing below it is ever a site.
STORE_ATTR = "restune"

BLOCK, ATTN, MLP, LINEAR, NORM, PATCH_EMBED = "block", "attn", "mlp", "linear", "norm", "patch_embed"
SPLIT_NAMES = ("q", "k", "v")
_LAYER_RE = re.compile(r"^blocks\.(\d+)(?:\.|$)")


class SiteMatchError(ValueError):
    """A site pattern matched nothing (or only sites the tuner cannot bind to)."""


@dataclass(frozen=True, eq=False)
class Site:
    """One frozen operation a tuner can bind to.

    Attributes:
        name: dotted name, e.g. ``blocks.3.mlp`` or the virtual ``blocks.3.attn.q``.
        kind: one of ``block``, ``attn``, ``mlp``, ``linear``, ``norm``, ``patch_embed``.
        module: the module whose forward the tuner hooks. For a virtual q/k/v site this is the fused ``qkv`` linear.
        in_features: width of what the tuner reads.
        out_features: width of what the tuner adds to.
        layer: block index for sites inside ``blocks.{i}``, else None.
        rows: for a virtual q/k/v site, the (start, stop) row block of the fused qkv weight; else None.
        attention: the attention module for ``attn`` sites (holds ``qkv``, ``proj``, ``num_heads``); else None.
        patch_size: the model's patch side length, for initialisations defined by it (VPT-style prompts).
    """

    name: str
    kind: str
    module: nn.Module
    in_features: int
    out_features: int
    layer: int | None = None
    rows: tuple[int, int] | None = None
    attention: nn.Module | None = None
    patch_size: int | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The frozen weight of a linear site in PyTorch (out, in) layout; a view for q/k/v, never a copy."""
        if self.kind != LINEAR:
            raise TypeError(f"site {self.name!r} is a {self.kind} site and has no single weight")
        weight = self.module.weight
        return weight if self.rows is None else weight[self.rows[0] : self.rows[1]]

    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen bias of a linear site (a view for q/k/v), or None."""
        if self.kind != LINEAR:
            raise TypeError(f"site {self.name!r} is a {self.kind} site and has no single bias")
        bias = self.module.bias
        if bias is None or self.rows is None:
            return bias
        return bias[self.rows[0] : self.rows[1]]

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype


def _kind_of(module: nn.Module) -> str | None:
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.LayerNorm):
        return NORM
    children = dict(module.named_children())
    if {"attn", "mlp", "norm1", "norm2"} <= children.keys():
        return BLOCK
    if isinstance(children.get("qkv"), nn.Linear) and isinstance(children.get("proj"), nn.Linear):
        return ATTN if hasattr(module, "num_heads") else None
    if isinstance(children.get("fc1"), nn.Linear) and isinstance(children.get("fc2"), nn.Linear):
        return MLP
    if isinstance(children.get("proj"), nn.Conv2d) and hasattr(module, "patch_size"):
        return PATCH_EMBED
    return None


def _width(module: nn.Module, kind: str) -> tuple[int, int]:
    if kind == LINEAR:
        return module.in_features, module.out_features
    if kind == NORM:
        width = int(module.normalized_shape[-1])
        return width, width
    if kind == BLOCK:
        width = module.attn.qkv.in_features
        return width, width
    if kind == ATTN:
        return module.qkv.in_features, module.proj.out_features
    if kind == MLP:
        return module.fc1.in_features, module.fc2.out_features
    if kind == PATCH_EMBED:
        return module.proj.in_channels, module.proj.out_channels
    raise AssertionError(kind)


def find_sites(model: nn.Module) -> dict[str, Site]:
    """Every site of ``model``, keyed by dotted name, in module order.

    The classifier head, ``nn.Identity`` placeholders and restune's own tuner modules are never sites.
    """
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    modules = dict(model.named_modules())
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch) if patch is not None else None
    sites: dict[str, Site] = {}
    for name, module in modules.items():
        if not name or module is classifier or name.split(".")[0] == STORE_ATTR:
            continue
        kind = _kind_of(module)
        if kind is None:
            continue
        match = _LAYER_RE.match(name)
        layer = int(match.group(1)) if match else None
        in_f, out_f = _width(module, kind)
        attention = module if kind == ATTN else None
        sites[name] = Site(name, kind, module, in_f, out_f, layer, attention=attention, patch_size=patch_size)
        parent = modules.get(name.rpartition(".")[0])
        if kind == LINEAR and name.endswith(".qkv") and parent is not None and _kind_of(parent) == ATTN:
            part = out_f // 3
            for index, split in enumerate(SPLIT_NAMES):
                rows = (index * part, (index + 1) * part)
                split_name = f"{name[:-4]}.{split}"
                sites[split_name] = Site(split_name, LINEAR, module, in_f, part, layer, rows, patch_size=patch_size)
    return sites


def _pattern_text(pattern: str | Sequence[str]) -> str:
    return repr(pattern) if isinstance(pattern, str) else repr(list(pattern))


def _closest(pattern: str | Sequence[str], names: Sequence[str]) -> list[str]:
    keys = [pattern] if isinstance(pattern, str) else list(pattern)
    found: list[str] = []
    for key in keys:
        for candidate in difflib.get_close_matches(key, names, n=5, cutoff=0.4):
            if candidate not in found:
                found.append(candidate)
    return found[:8] or list(names[:8])


def _matches(name: str, pattern: str | Sequence[str]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def match_sites(
    sites: Mapping[str, Site],
    pattern: str | Sequence[str],
    layers: Sequence[int] | None = None,
    kinds: frozenset[str] | None = None,
    who: str = "tuner",
) -> list[Site]:
    """The sites a pattern selects, following peft's ``target_modules`` rules.

    A string is a regular expression that must match the whole dotted name; a list matches names exactly or by
    dotted suffix (``"attn.q"`` matches ``blocks.0.attn.q``). ``layers`` keeps only sites inside those blocks.

    Raises:
        SiteMatchError: nothing matched, or a matched site has a kind the tuner cannot bind to. The message names
            the pattern and the closest site names so the fix is obvious.
    """
    if isinstance(pattern, str):
        try:
            re.compile(pattern)
        except re.error as err:
            raise SiteMatchError(f"{who}: site pattern {pattern!r} is not a valid regular expression: {err}") from None
    names = list(sites)
    chosen = [sites[n] for n in names if _matches(n, pattern)]
    if not chosen:
        raise SiteMatchError(
            f"{who}: site pattern {_pattern_text(pattern)} matched no site of this model. A string is a regex that "
            f"must match the whole dotted name; a list matches exact names or dotted suffixes. Closest site names: "
            f"{', '.join(_closest(pattern, names))}"
        )
    if layers is not None:
        depth = 1 + max((s.layer for s in sites.values() if s.layer is not None), default=-1)
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise SiteMatchError(f"{who}: layers {bad} do not exist; this model has blocks 0..{depth - 1}")
        chosen = [s for s in chosen if s.layer in set(layers)]
        if not chosen:
            raise SiteMatchError(
                f"{who}: site pattern {_pattern_text(pattern)} matched no site inside blocks {list(layers)}"
            )
    if kinds is not None:
        wrong = [s for s in chosen if s.kind not in kinds]
        if wrong:
            examples = ", ".join(f"{s.name} ({s.kind})" for s in wrong[:4])
            raise SiteMatchError(
                f"{who}: site pattern {_pattern_text(pattern)} matched {len(wrong)} site(s) it cannot bind to, e.g. "
                f"{examples}; it binds to {', '.join(sorted(kinds))} sites. Narrow the pattern."
            )
    return chosen
