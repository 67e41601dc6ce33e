"""Parity of ARC against the ``arc_vit`` fixtures (official ``Model/ARC_ViT.py``; docs/fixtures.md §5.3).

The fixture's tensors map onto restune's ARC adapters as follows (``<p>`` is ``attn`` or ``mlp``):

- ``tuner.shared.<p>_U`` (D, r): the U Parameter every ``blocks.i.<p>.arc`` adapter shares;
- ``tuner.blocks.i.<p>_adapter.rescale`` (r,) and ``.bias`` (D,): that block's ``rescale`` and ``bias``;
- ``tuner.head.*``: the timm head.

The shared U's gradient is the sum over blocks; autograd accumulates it because one Parameter is used everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from restune.parity_checks.common import Comparison, build_fixture_vit
from restune.spec import TuneSpec
from restune.tune import tune
from restune.tuners.arc import ARCConfig

__all__ = ["CHECKS", "check_arc_vit"]

# Official ``tuning_mode`` -> the sites restune binds.
_MODES = {"ARC": r"blocks\.\d+\.(attn|mlp)", "ARC_att": r"blocks\.\d+\.attn"}
_SHARED = re.compile(r"^tuner\.shared\.(attn|mlp)_U$")
_PER_BLOCK = re.compile(r"^tuner\.blocks\.(\d+)\.(attn|mlp)_adapter\.(rescale|bias)$")
_MERGED = re.compile(r"^outputs\.(blocks\.\d+\.(?:attn\.qkv|mlp\.fc1))\.merged_(weight|bias)$")


def _sources(model: nn.Module, t: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """Fixture tensor name -> the restune Parameter that holds it; every ``tuner.*`` tensor must map."""
    adapters = {key.removesuffix(".arc"): tuner for key, tuner in model.restune.sets["default"].named_tuners()}
    sources: dict[str, nn.Parameter] = {"tuner.head.weight": model.head.weight, "tuner.head.bias": model.head.bias}
    for key in t:
        if not key.startswith("tuner.") or key in sources:
            continue
        shared, per_block = _SHARED.match(key), _PER_BLOCK.match(key)
        if shared:
            owners = [a for site, a in adapters.items() if site.endswith("." + shared.group(1))]
            sources[key] = owners[0].U if owners else None
        elif per_block:
            adapter = adapters.get(f"blocks.{per_block.group(1)}.{per_block.group(2)}")
            sources[key] = getattr(adapter, per_block.group(3)) if adapter is not None else None
        else:
            sources[key] = None
        if sources[key] is None:
            raise ValueError(f"arc_vit: fixture tensor {key!r} has no ARC counterpart in the model restune built")
    covered = {id(p) for p in sources.values()}
    missing = [n for n, p in model.restune.named_parameters() if id(p) not in covered]
    if missing:
        raise ValueError(f"arc_vit: restune parameters {missing[:4]} get no value from the fixture")
    return sources


def check_arc_vit(meta: dict[str, Any], t: dict[str, torch.Tensor]) -> dict[str, Any]:
    """ARC on the fixture's ViT: logits (and any merged qkv/fc1 weights) and every gradient, at its tolerance."""
    cfg = meta["config"]
    mode = cfg.get("tuning_mode", "ARC")
    if mode not in _MODES:
        raise ValueError(f"arc_vit: tuning_mode {mode!r} is not one of {sorted(_MODES)}")
    model = build_fixture_vit(meta, t)
    config = ARCConfig(sites=_MODES[mode], r=int(cfg["rank_r"]), dropout=float(cfg.get("adapter_dropout", 0.0)))
    tune(model, TuneSpec([config], head="train"))
    sources = _sources(model, t)
    with torch.no_grad():
        for key, param in sources.items():
            param.copy_(t[key])
    model.eval()
    images = t["inputs.images"].clone().requires_grad_("grads.inputs.images" in meta["grads"])
    logits = model(images)
    (logits * t["inputs.cotangent"]).sum().backward()
    adapters = dict(model.restune.sets["default"].named_tuners())
    cmp = Comparison(meta["tolerance"])
    for name in meta["outputs"]:
        merged = _MERGED.match(name)
        if name == "outputs.logits":
            cmp.add(name, logits, t[name], "outputs")
        elif merged:
            linear_name, part = merged.groups()
            linear = model.get_submodule(linear_name)
            weight, bias = adapters[f"{linear_name.rpartition('.')[0]}.arc"].fold_into(linear.weight, linear.bias)
            cmp.add(name, weight if part == "weight" else bias, t[name], "outputs")
        else:
            cmp.failures.append(f"{name}: no rule to compute this output")
            cmp.errors[f"outputs:{name}"] = float("inf")
    for name in meta["grads"]:
        target = name[len("grads.") :]
        cmp.add(name, images.grad if target == "inputs.images" else sources[target].grad, t[name], "grads")
    return cmp.result()


CHECKS: dict[str, Callable[[dict[str, Any], dict[str, torch.Tensor]], dict[str, Any]]] = {"arc_vit": check_arc_vit}
