"""Parity of RLRR with the official zstarN70/RLRR code: the ``rlrr_linear`` and ``rlrr_vit`` fixtures.

Both checks build restune's own modules through ``restune.tune`` (so the hooks that run in training are the ones
checked), copy the fixture's tuner values in, run forward and backward on ``(output * cotangent).sum()`` and
compare every ``outputs.*`` and ``grads.*`` tensor with the fixture's tolerance (docs/fixtures.md §2a, §5.1-5.2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from restune.parity_checks.common import Comparison, build_fixture_vit
from restune.spec import TuneSpec
from restune.tune import tune
from restune.tuners.rlrr import RLRRConfig, rlrr_spec

__all__ = ["CHECKS", "check_rlrr_linear", "check_rlrr_vit"]

Tensor = torch.Tensor


class _OneLinear(nn.Module):
    """The smallest model with one linear site (``linear``): what ``RLRRLinear`` wraps in the official fixture."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def _tuners(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.restune.sets["default"].named_tuners())


def _load(sources: dict[str, nn.Parameter], t: dict[str, Tensor], cmp: Comparison) -> None:
    """Copy every fixture ``tuner.*`` tensor into its restune parameter; a tensor without a home is a failure."""
    unmapped = [key for key in t if key.startswith("tuner.") and key not in sources]
    missing = [key for key in sources if key not in t]
    if unmapped:
        cmp.failures.append(f"fixture tuner tensors without a restune parameter: {unmapped[:6]}")
    if missing:
        cmp.failures.append(f"restune parameters the fixture does not set: {missing[:6]}")
    with torch.no_grad():
        for key, param in sources.items():
            if key in t:
                if t[key].numel() != param.numel():
                    cmp.failures.append(f"{key}: fixture shape {tuple(t[key].shape)} != {tuple(param.shape)}")
                    continue
                param.copy_(t[key].reshape(param.shape))


def check_rlrr_linear(meta: dict[str, Any], t: dict[str, Tensor]) -> dict[str, Any]:
    """RLRR on one ``nn.Linear`` (official ``RLRRLinear``): y, the merged weight and bias, and every gradient."""
    cfg = meta["config"]
    linear = nn.Linear(cfg["in_features"], cfg["out_features"], bias=bool(cfg["bias"]))
    with torch.no_grad():
        linear.weight.copy_(t["frozen.weight"])
        if linear.bias is not None:
            linear.bias.copy_(t["frozen.bias"])
    model = tune(_OneLinear(linear), TuneSpec([RLRRConfig(sites=["linear"])], head="freeze"))
    tuner = _tuners(model)["linear.rlrr"]
    cmp = Comparison(meta["tolerance"])
    sources = {f"tuner.{name}": param for name, param in tuner.named_parameters()}
    if linear.bias is None and "tuner.shift_bias" not in t:
        sources.pop("tuner.shift_bias")  # a bias-free official linear without f: keep restune's f at zero
    _load(sources, t, cmp)
    model.eval()
    x = t["inputs.x"].clone().requires_grad_(True)
    y = model(x)
    (y * t["inputs.cotangent"]).sum().backward()
    with torch.no_grad():
        frozen_bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
        derived = {
            "outputs.y": y,
            "outputs.merged_weight": linear.weight + tuner.delta_weight(),
            "outputs.merged_bias": frozen_bias + tuner.delta_bias(),
            "outputs.delta_weight": tuner.delta_weight(),
        }
    for name in meta["outputs"]:
        if name not in derived:
            cmp.failures.append(f"{name}: an output restune does not know how to produce")
            continue
        cmp.add(name, derived[name], t[name], "outputs")
    for name in meta["grads"]:
        target = name[len("grads.") :]
        if target == "inputs.x":
            cmp.add(name, x.grad, t[name], "grads")
        elif target in sources:
            cmp.add(name, sources[target].grad, t[name], "grads")
        else:
            cmp.failures.append(f"{name}: gradient of a tensor restune does not have")
    return cmp.result()


# restune's SSF parameter names -> the fixture's names of the SSF pairs.
_SSF_NAMES = {"scale": "ssf_scale", "shift": "ssf_shift"}


def check_rlrr_vit(meta: dict[str, Any], t: dict[str, Tensor]) -> dict[str, Any]:
    """RLRR + SSF on a whole timm ViT (official ``RLRRVisionTransformer``), built with the ``rlrr`` defaults.

    The library's default sites are used, not sites read off the fixture, so a placement that differs from the
    official one shows up as fixture tensors without a home (or restune parameters the fixture does not set).
    """
    model = build_fixture_vit(meta, t)
    tune(model, rlrr_spec())
    sources: dict[str, nn.Parameter] = {"tuner.head.weight": model.head.weight, "tuner.head.bias": model.head.bias}
    for key, tuner in _tuners(model).items():
        site, _, kind = key.rpartition(".")
        for name, param in tuner.named_parameters():
            if kind == "rlrr":
                sources[f"tuner.{site}.{name}"] = param
            elif kind == "ssf":
                sources[f"tuner.{site}.{_SSF_NAMES[name]}"] = param
            else:
                raise AssertionError(f"unexpected tuner {key} in the rlrr spec")
    cmp = Comparison(meta["tolerance"])
    _load(sources, t, cmp)
    model.eval()
    logits = model(t["inputs.images"])
    (logits * t["inputs.cotangent"]).sum().backward()
    for name in meta["outputs"]:
        if name != "outputs.logits":
            cmp.failures.append(f"{name}: an output restune does not know how to produce")
            continue
        cmp.add(name, logits, t[name], "outputs")
    for name in meta["grads"]:
        target = name[len("grads.") :]
        if target not in sources:
            cmp.failures.append(f"{name}: gradient of a tensor restune does not have")
            continue
        # The k shift_bias gradient is zero by construction (softmax cancels a shift common to all keys); a None or
        # rounding-noise gradient is compared like any other.
        cmp.add(name, sources[target].grad, t[name], "grads")
    return cmp.result()


CHECKS: dict[str, Callable[[dict[str, Any], dict[str, Tensor]], dict[str, Any]]] = {
    "rlrr_linear": check_rlrr_linear,
    "rlrr_vit": check_rlrr_vit,
}
