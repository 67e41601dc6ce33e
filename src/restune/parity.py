"""Parity checks against fixtures made from the official implementations (the fixtures' README, §2a).

``check(path)`` dispatches on the fixture's stem, builds what the fixture describes from its JSON (every shape and
hyper-parameter is read from there, never assumed), copies the stored tensors into restune's own modules, runs
forward and backward on ``loss = (output * cotangent).sum()`` in fp32 on the CPU, and compares every output and
gradient within the fixture's own tolerance.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

__all__ = ["check", "supported_fixtures", "Comparison"]


class Comparison:
    """Collects (actual, expected) pairs and judges them with ``torch.testing.assert_close`` semantics."""

    def __init__(self, tolerance: dict[str, Any]) -> None:
        self.tolerance = tolerance
        self.errors: dict[str, float] = {}
        self.failures: list[str] = []

    def add(self, name: str, actual: torch.Tensor | None, expected: torch.Tensor, group: str, exact: bool = False):
        """Compare one tensor; ``group`` is "outputs" or "grads" (which tolerance and which maximum it feeds)."""
        if actual is None:
            actual = torch.zeros_like(expected)  # a parameter that received no gradient has a zero gradient
        actual = actual.detach().to(torch.float64)
        if actual.numel() == expected.numel():  # official layouts may carry singleton dimensions, e.g. (1, r)
            actual = actual.reshape(expected.shape)
        expected = expected.to(torch.float64)
        if actual.shape != expected.shape:
            self.failures.append(f"{name}: shape {tuple(actual.shape)} != fixture {tuple(expected.shape)}")
            self.errors[f"{group}:{name}"] = float("inf")
            return
        err = (actual - expected).abs()
        self.errors[f"{group}:{name}"] = float(err.max()) if err.numel() else 0.0
        atol, rtol = (0.0, 0.0) if exact else (self.tolerance[group]["atol"], self.tolerance[group]["rtol"])
        if not bool((err <= atol + rtol * expected.abs()).all()):
            self.failures.append(f"{name}: max abs err {self.errors[f'{group}:{name}']:.3g} (atol {atol}, rtol {rtol})")

    def result(self) -> dict[str, Any]:
        def worst(group: str) -> float:
            return max((v for k, v in self.errors.items() if k.startswith(group + ":")), default=0.0)

        return {
            "passed": not self.failures,
            "max_abs_err": worst("outputs"),
            "max_abs_err_grads": worst("grads"),
            "failures": self.failures,
            "errors": {k.split(":", 1)[1]: v for k, v in self.errors.items()},
        }


def _activation_name(text: str | None) -> str:
    text = (text or "gelu").lower()
    if "tanh" in text:
        return "gelu_tanh"
    for name in ("quick_gelu", "gelu", "relu", "silu"):
        if name in text:
            return name
    raise ValueError(f"fixture activation {text!r} is not one restune knows")


def _check_res_adapter(meta: dict[str, Any], t: dict[str, torch.Tensor]) -> dict[str, Any]:
    from restune.tuners.adapter import SwiftResAdapter

    cfg = meta["config"]
    module = SwiftResAdapter(
        cfg["dim"],
        cfg["adapter_length"],
        activation=_activation_name(cfg.get("activation")),
        scale=cfg.get("adapter_weight") or "none",
        dtype=torch.float32,
    )
    return _run_module(module, meta, t, "inputs.x", "outputs.y")[0].result()


def _run_module(
    module: nn.Module, meta: dict[str, Any], t: dict[str, torch.Tensor], input_key: str, output_key: str
) -> tuple[Comparison, torch.Tensor]:
    """Run a module on a fixture and compare its output and every stored gradient.

    The fixture's ``tuner.*`` tensors are copied into the module's parameters of the same names; the loss is the
    fixture's cotangent product; a gradient name is either a tuner parameter's or the input's.
    """
    _copy_named(module, t, "tuner.")
    module.eval()
    inputs = t[input_key].clone().requires_grad_(True)
    output = module(inputs)
    (output * t["inputs.cotangent"]).sum().backward()
    cmp = Comparison(meta["tolerance"])
    cmp.add(output_key, output, t[output_key], "outputs")
    params = dict(module.named_parameters())
    for name in meta["grads"]:
        target = name[len("grads.") :]
        actual = inputs.grad if target == input_key else params[target[len("tuner.") :]].grad
        cmp.add(name, actual, t[name], "grads")
    return cmp, inputs


def _copy_named(module: nn.Module, t: dict[str, torch.Tensor], prefix: str) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for key, value in t.items():
            if key.startswith(prefix):
                name = key[len(prefix) :]
                if name not in params:
                    raise KeyError(f"fixture tensor {key} has no counterpart {name!r} in {type(module).__name__}")
                params[name].copy_(value.reshape(params[name].shape))


def build_fixture_vit(meta: dict[str, Any], t: dict[str, torch.Tensor]) -> nn.Module:
    """The timm ViT a model-level fixture describes, with its frozen weights and head loaded."""
    from timm.models.vision_transformer import VisionTransformer

    v = meta["config"]["vit"]
    vit = VisionTransformer(
        img_size=v["img_size"],
        patch_size=v["patch_size"],
        embed_dim=v["embed_dim"],
        depth=v["depth"],
        num_heads=v["num_heads"],
        mlp_ratio=v["mlp_ratio"],
        num_classes=v["num_classes"],
        qkv_bias=v.get("qkv_bias", True),
        class_token=v.get("class_token", True),
        global_pool=v.get("global_pool", "token"),
    )
    state = {k[len("frozen.") :]: x for k, x in t.items() if k.startswith("frozen.")}
    state.update({k[len("tuner.") :]: x for k, x in t.items() if k.startswith("tuner.head.")})
    vit.load_state_dict(state, strict=True)
    return vit


def _check_lora_peft(meta: dict[str, Any], t: dict[str, torch.Tensor]) -> dict[str, Any]:
    import restune
    from restune.tuners.lora import LoraConfig

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
    restune.tune(model, restune.TuneSpec([config], head="train"))
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


def _check_bypass(meta: dict[str, Any], t: dict[str, torch.Tensor]) -> dict[str, Any]:
    from restune.bypass import Bypass, BypassConfig

    cfg = meta["config"]
    backbone = build_fixture_vit(meta, t)
    config = BypassConfig(bottleneck=cfg["adapter_length"], zero_init_last=bool(cfg.get("zero_init_last", False)))
    model = Bypass(backbone.requires_grad_(True), config, num_classes=meta["config"]["vit"]["num_classes"])
    cmp, images = _run_module(model, meta, t, "inputs.images", "outputs.logits")
    leaked = [n for n, p in backbone.named_parameters() if p.grad is not None] + ["images"] * (images.grad is not None)
    if leaked:
        cmp.failures.append(f"gradient reached the backbone or the images: {leaked[:5]}")
    return cmp.result()


def _all_checks() -> dict[str, Callable[[dict[str, Any], dict[str, torch.Tensor]], dict[str, Any]]]:
    from restune.parity_checks import arc, rlrr, snell

    return {
        "restuning_res_adapter": _check_res_adapter,
        "lora_vit_peft": _check_lora_peft,
        "restuning_bypass_vit": _check_bypass,
        **rlrr.CHECKS,
        **arc.CHECKS,
        **snell.CHECKS,
    }


def supported_fixtures() -> list[str]:
    """Fixture stems this version of restune can check."""
    return sorted(_all_checks())


def check(path: str | Path) -> dict[str, Any]:
    """Run one parity fixture.

    Args:
        path: the fixture's path without extension (``.../lora_vit_peft``); a ``.json`` or ``.safetensors`` suffix
            is accepted too.

    Returns:
        ``passed`` (bool), ``max_abs_err`` over outputs, ``max_abs_err_grads`` over gradients, and, to explain a
        failure, ``failures`` and per-tensor ``errors``.
    """
    base = Path(path)
    if base.suffix in (".json", ".safetensors"):
        base = base.with_suffix("")
    json_path, tensor_path = base.with_suffix(".json"), base.with_suffix(".safetensors")
    if not json_path.is_file() or not tensor_path.is_file():
        raise FileNotFoundError(f"fixture {base} needs {json_path.name} and {tensor_path.name} side by side")
    meta = json.loads(json_path.read_text())
    stem = meta.get("name") or base.name
    checks = _all_checks()
    if stem not in checks:
        raise ValueError(f"unknown fixture stem {stem!r}; supported: {', '.join(supported_fixtures())}")
    tensors = {k: v.to(torch.float32) for k, v in load_file(str(tensor_path)).items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return checks[stem](meta, tensors)
