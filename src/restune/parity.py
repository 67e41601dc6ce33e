"""Parity checks against fixtures made from the official implementations (docs/fixtures.md, §2a).

``check(path)`` dispatches on the fixture's stem, builds what the fixture describes from its JSON (every shape and
hyper-parameter is read from there, never assumed), copies the stored tensors into restune's own modules, runs
forward and backward on ``loss = (output * cotangent).sum()`` in fp32 on the CPU, and compares every output and
gradient within the fixture's own tolerance.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from restune.parity_checks import arc, lora, restuning, rlrr, snell
from restune.parity_checks.common import Comparison, build_fixture_vit

__all__ = ["check", "supported_fixtures", "Comparison", "build_fixture_vit"]


def _all_checks() -> dict[str, Callable[[dict[str, Any], dict[str, torch.Tensor]], dict[str, Any]]]:
    """Fixture stem -> check; each method's module of ``restune.parity_checks`` lists its own."""
    return {**restuning.CHECKS, **lora.CHECKS, **rlrr.CHECKS, **arc.CHECKS, **snell.CHECKS}


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
