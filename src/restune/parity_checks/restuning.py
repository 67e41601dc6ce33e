"""Parity of swift's Res-Tuning modules: the Res-Adapter alone and the ViT bypass (fixture stems ``restuning_*``)."""

from __future__ import annotations

from typing import Any

import torch

from restune.bypass import Bypass, BypassConfig
from restune.parity_checks.common import activation_name, build_fixture_vit, run_module
from restune.tuners.adapter import SwiftResAdapter

__all__ = ["CHECKS"]


def check_res_adapter(meta: dict[str, Any], t: dict[str, torch.Tensor]) -> dict[str, Any]:
    cfg = meta["config"]
    module = SwiftResAdapter(
        cfg["dim"],
        cfg["adapter_length"],
        activation=activation_name(cfg.get("activation")),
        scale=cfg.get("adapter_weight") or "none",
        dtype=torch.float32,
    )
    return run_module(module, meta, t, "inputs.x", "outputs.y")[0].result()


def check_bypass(meta: dict[str, Any], t: dict[str, torch.Tensor]) -> dict[str, Any]:
    cfg = meta["config"]
    backbone = build_fixture_vit(meta, t)
    config = BypassConfig(bottleneck=cfg["adapter_length"], zero_init_last=bool(cfg.get("zero_init_last", False)))
    model = Bypass(backbone.requires_grad_(True), config, num_classes=meta["config"]["vit"]["num_classes"])
    cmp, images = run_module(model, meta, t, "inputs.images", "outputs.logits")
    leaked = [n for n, p in backbone.named_parameters() if p.grad is not None] + ["images"] * (images.grad is not None)
    if leaked:
        cmp.failures.append(f"gradient reached the backbone or the images: {leaked[:5]}")
    return cmp.result()


CHECKS = {"restuning_res_adapter": check_res_adapter, "restuning_bypass_vit": check_bypass}
