"""The configurations a benchmark compares, each built the same way and run by the same step function.

Every configuration is a ``Runner``: ``step(images, labels)`` does one training step (forward, backward, AdamW
update), or, for the floors, one forward without training. Peers are measured in the same run so results are
ratios, never absolute claims.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

import restune
from restune.backbones import block_features
from restune.optional import require

__all__ = ["Runner", "CONFIGS", "TRAINING", "FLOORS", "build", "make_backbone"]


@dataclass
class Runner:
    """One benchmark configuration, ready to step."""

    name: str
    step: Callable[[torch.Tensor, torch.Tensor], None]
    trainable: int


def make_backbone(model_name: str, num_classes: int, img_size: int | None, device: torch.device) -> nn.Module:
    """A randomly initialised timm model (benchmarks measure cost, not accuracy)."""
    kwargs = {"img_size": img_size} if img_size else {}
    torch.manual_seed(0)
    return timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs).to(device)


def _trainer(name: str, model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> Runner:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = F.cross_entropy(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return Runner(name, step, sum(p.numel() for p in params))


def _full(model: nn.Module) -> Runner:
    return _trainer("full fine-tuning", model.requires_grad_(True).train(), model)


def _linear(model: nn.Module) -> Runner:
    model.requires_grad_(False).get_classifier().requires_grad_(True)
    return _trainer("linear probe", model.train(), model)


def _peft_lora(model: nn.Module) -> Runner:
    peft = require("peft", "peft", "restune bench's peft_lora configuration")
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], lora_dropout=0.0, modules_to_save=["head"])
    peft_model = peft.get_peft_model(model, config).train()
    return _trainer("peft LoRA (fused qkv)", peft_model, peft_model)


def _restune(preset: str) -> Callable[[nn.Module], Runner]:
    def build_it(model: nn.Module) -> Runner:
        return _trainer(f"restune {preset}", restune.tune(model, preset).train(), model)

    return build_it


def _bypass(spec: str | dict, label: str) -> Callable[[nn.Module], Runner]:
    def build_it(model: nn.Module) -> Runner:
        bypass = restune.Bypass(model, spec, num_classes=model.num_classes).train()
        return _trainer(label, bypass, bypass)

    return build_it


def _bypass_cached(model: nn.Module) -> Runner:
    bypass = restune.Bypass(model, "res_tuning_bypass", num_classes=model.num_classes).train()
    cache: dict[int, dict[int, torch.Tensor]] = {}

    def forward(images: torch.Tensor) -> torch.Tensor:
        key = images.data_ptr()
        if key not in cache:  # extracted once, outside the measured step (the warm-up step fills it)
            cache.clear()
            cache[key] = bypass.features(images)
        return bypass.logits_from_features(cache[key])

    runner = _trainer("Bypass from cache", bypass, forward)
    return Runner(runner.name, runner.step, sum(p.numel() for p in bypass.trainable_parameters()))


def _floor_features(model: nn.Module) -> Runner:
    model.requires_grad_(False).eval()
    keys = list(range(len(model.blocks) + 1))

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        block_features(model, images, keys)

    return Runner("floor: no-grad forward with features", step, 0)


def _floor_inference(model: nn.Module) -> Runner:
    model.requires_grad_(False).eval()

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.inference_mode():
            model(images)

    return Runner("floor: inference forward", step, 0)


CONFIGS: dict[str, Callable[[nn.Module], Runner]] = {
    "full": _full,
    "linear": _linear,
    "peft_lora": _peft_lora,
    "lora": _restune("lora"),
    "res_adapter": _restune("res_adapter"),
    **{name: _restune(name) for name in ("vpt_shallow", "vpt_deep", "adapter", "adaptformer", "prefix")},
    "bypass": _bypass("res_tuning_bypass", "Bypass"),
    "bypass_attn": _bypass({"lateral": {"type": "res_attn"}}, "Bypass, Res-Attn lateral (class-token queries)"),
    "bypass_attn_all": _bypass({"vertical": {"type": "res_attn"}}, "Bypass, Res-Attn vertical (all tokens)"),
    "bypass_cached": _bypass_cached,
    "floor_features": _floor_features,
    "floor_inference": _floor_inference,
}
TRAINING = [k for k in CONFIGS if not k.startswith("floor")]
FLOORS = ["floor_features", "floor_inference"]


def build(name: str, model: nn.Module) -> Runner:
    """Build one configuration on a fresh backbone."""
    if name not in CONFIGS:
        raise ValueError(f"unknown benchmark configuration {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name](model)
