"""Parity of restune's LoRA against peft's on a timm ViT's fused qkv (fixture stem ``lora_vit_peft``)."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from restune.parity_checks.common import Comparison, build_fixture_vit
from restune.spec import TuneSpec
from restune.tune import tune
from restune.tuners.lora import LoraConfig

__all__ = ["CHECKS"]


def check_lora_peft(meta: dict[str, Any], t: dict[str, torch.Tensor]) -> dict[str, Any]:
    cfg = meta["config"]
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"lora_vit_peft with bias={cfg['bias']!r} is not supported; restune's LoRA trains no bias")
    model = build_fixture_vit(meta, t)
    config = LoraConfig(
        sites=list(cfg["target_modules"]),
        r=cfg["r"],
        alpha=cfg["lora_alpha"],
        dropout=cfg["lora_dropout"],
        use_rslora=bool(cfg.get("use_rslora", False)),
    )
    tune(model, TuneSpec([config], head="train"))
    tuners = dict(model.restune.sets["default"].named_tuners())
    pattern = re.compile(r"^tuner\.(.+)\.lora_([AB])$")
    sources: dict[str, nn.Parameter] = {"tuner.head.weight": model.head.weight, "tuner.head.bias": model.head.bias}
    for key in t:
        match = pattern.match(key)
        if match:
            sources[key] = getattr(tuners[f"{match.group(1)}.lora"], match.group(2))
    with torch.no_grad():
        for key, param in sources.items():
            param.copy_(t[key])
    model.eval()
    logits = model(t["inputs.images"])
    (logits * t["inputs.cotangent"]).sum().backward()
    cmp = Comparison(meta["tolerance"])
    for name in meta["outputs"]:
        if name == "outputs.logits":
            cmp.add(name, logits, t[name], "outputs")
            continue
        site = re.fullmatch(r"outputs\.(.+)\.merged_weight", name).group(1)
        merged = model.get_submodule(site).weight + tuners[f"{site}.lora"].delta_weight()
        cmp.add(name, merged, t[name], "outputs")
    for name in meta["grads"]:
        cmp.add(name, sources[name[len("grads.") :]].grad, t[name], "grads")
    return cmp.result()


CHECKS = {"lora_vit_peft": check_lora_peft}
