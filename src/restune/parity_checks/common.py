"""What every parity check shares: the comparison, the fixture ViT, and running a module on a fixture."""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["Comparison", "build_fixture_vit", "run_module", "copy_named", "activation_name"]


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


def activation_name(text: str | None) -> str:
    """The restune name of the activation a fixture's config describes (swift writes class names or strings)."""
    text = (text or "gelu").lower()
    if "tanh" in text:
        return "gelu_tanh"
    for name in ("quick_gelu", "gelu", "relu", "silu"):
        if name in text:
            return name
    raise ValueError(f"fixture activation {text!r} is not one restune knows")


def run_module(
    module: nn.Module, meta: dict[str, Any], t: dict[str, torch.Tensor], input_key: str, output_key: str
) -> tuple[Comparison, torch.Tensor]:
    """Run a module on a fixture and compare its output and every stored gradient.

    The fixture's ``tuner.*`` tensors are copied into the module's parameters of the same names; the loss is the
    fixture's cotangent product; a gradient name is either a tuner parameter's or the input's.
    """
    copy_named(module, t, "tuner.")
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


def copy_named(module: nn.Module, t: dict[str, torch.Tensor], prefix: str) -> None:
    """Copy the fixture tensors under ``prefix`` into the module's parameters of the same names (reshaped)."""
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
