"""Parity checks for SNELL / KLoRA on one linear (docs/fixtures.md §5.4): stems ``snell_linear_{sparse,klora}``.

The fixture's linear is wrapped in a one-child module so ``restune.tune`` finds it as a site and the tuner runs
through the same hook as on a ViT. Every shape and hyper-parameter comes from the JSON; the stored factors are
copied into the tuner; y, every derived output (sparse and dense delta, threshold, mask) and every gradient
(factors, learnable kernel weights if stored, and the input) are compared.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from restune.parity_checks.common import Comparison
from restune.spec import TuneSpec
from restune.tune import tune
from restune.tuners.snell import SnellConfig

__all__ = ["CHECKS", "check_snell_linear"]

# Official (or alternative) tensor names -> the tuner's parameter names.
_ALIASES = {"In_Qs": "in_factors", "Out_Qs": "out_factors", "shared_coeff_fc": "kernel_coeff"}


class _Holder(nn.Module):
    """A model whose only site is ``linear``: the smallest thing ``restune.tune`` binds to."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def check_snell_linear(meta: dict[str, Any], t: dict[str, torch.Tensor]) -> dict[str, Any]:
    """SNELL (init_thres > 0) or KLoRA (init_thres = 0) on one ``nn.Linear``, eval mode, fp32."""
    cfg = meta["config"]
    if cfg.get("tuner_bias", False):
        raise ValueError("snell fixture with tuner_bias=true: restune's SNELL branch has no bias (official default)")
    if cfg.get("factor_dim") is not None and cfg["factor_dim"] * cfg["num_Hs"] != cfg["rank_r"]:
        raise ValueError(
            f"snell fixture: factor_dim {cfg['factor_dim']} * num_Hs {cfg['num_Hs']} != rank {cfg['rank_r']}"
        )
    linear = nn.Linear(cfg["in_features"], cfg["out_features"], bias=bool(cfg.get("bias", True)))
    with torch.no_grad():
        linear.weight.copy_(t["frozen.weight"])
        if linear.bias is not None:
            linear.bias.copy_(t["frozen.bias"])
    model = _Holder(linear)
    config = SnellConfig(
        sites=["linear"],
        r=cfg["rank_r"],
        chunks=cfg["num_Hs"],
        sparsity=float(cfg["init_thres"]),
        kernel_coeff=[float(c) for c in cfg["kernel_coeff"]],
        learn_coeff=bool(cfg.get("kernel_coeff_trainable", False)),
        norm_p=float(cfg.get("norm_p", 2)),
        dropout=0.0,
        drop_path=0.0,
    )
    tune(model, TuneSpec([config], head="freeze"))
    tuner = dict(model.restune.sets["default"].named_tuners())["linear.snell"]
    params = dict(tuner.named_parameters())
    sources: dict[str, nn.Parameter] = {}
    for key in t:
        if key.startswith("tuner."):
            name = _ALIASES.get(key[len("tuner.") :], key[len("tuner.") :])
            if name not in params:
                raise KeyError(f"fixture tensor {key} has no counterpart in restune's SNELL ({sorted(params)})")
            sources[key] = params[name]
    with torch.no_grad():
        for key, param in sources.items():
            param.copy_(t[key].reshape(param.shape))
    model.eval()
    x = t["inputs.x"].clone().requires_grad_(True)
    y = model(x)
    (y * t["inputs.cotangent"]).sum().backward()
    with torch.no_grad():
        parts = tuner.parts()
    derived = {
        "outputs.y": y,
        "outputs.delta_weight": tuner.delta_weight(),
        "outputs.delta_weight_dense": parts.dense.t(),
        "outputs.threshold": parts.threshold,
        "outputs.sparse_mask": None if parts.mask is None else parts.mask.t().to(torch.float32),
    }
    cmp = Comparison(meta["tolerance"])
    for name in meta["outputs"]:
        if name not in derived:
            raise KeyError(f"snell fixture output {name} is not one restune knows how to produce")
        actual = derived[name]
        if actual is None:
            cmp.failures.append(f"{name}: the fixture stores it but init_thres = {cfg['init_thres']} does not sparsify")
            cmp.errors[f"outputs:{name}"] = float("inf")
            continue
        cmp.add(name, actual, t[name], "outputs", exact=name == "outputs.sparse_mask")
    for name in meta["grads"]:
        target = name[len("grads.") :]
        actual = x.grad if target == "inputs.x" else sources[target].grad
        cmp.add(name, actual, t[name], "grads")
    return cmp.result()


CHECKS: dict[str, Callable[[dict[str, Any], dict[str, torch.Tensor]], dict[str, Any]]] = {
    "snell_linear_sparse": check_snell_linear,
    "snell_linear_klora": check_snell_linear,
}
