"""Tuner training behaviour on a tiny timm ViT (the forwards against their equations: test_tuner_equations.py).

The Res-Tuning presets, LoRA and a few non-default placements are checked for which parameters get gradients at step
0 (docs/methods/res-tuning.md §3-6, res-attn.md, baselines.md); the placements also for identity at initialisation
and that training moves only the active set's tensors (for every preset, test_contract.py checks those two).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from conftest import make_images, make_vit, randn_like
from torch import nn

import restune
from restune.spec import resolve_spec
from restune.tune import classifier_path
from restune.tuners import (
    LoraConfig,
    ResAdapterConfig,
    ResAttnConfig,
    TunerConfig,
)

pytestmark = pytest.mark.usefixtures("single_thread")

Tensor = torch.Tensor
LayerFn = Callable[[int, Tensor], Tensor]

# ---------------------------------------------------------------------------------------------------------------
# The cases: every preset plus non-default placements.
# ---------------------------------------------------------------------------------------------------------------

EXTRA_CASES: dict[str, list[TunerConfig]] = {
    "res_adapter@block": [ResAdapterConfig(sites=r"blocks\.\d+", dim=4)],
    "res_adapter@attn": [ResAdapterConfig(sites=r"blocks\.\d+\.attn", dim=4)],
    "res_adapter@linear": [ResAdapterConfig(sites=r"blocks\.\d+\.mlp\.fc1", dim=4)],
    "res_attn@mlp": [ResAttnConfig(sites=r"blocks\.\d+\.mlp", r=8, heads=2)],
    "res_attn@block": [ResAttnConfig(sites=r"blocks\.\d+", r=8, heads=2)],
    "lora@qkv_fused": [LoraConfig(sites=["attn.qkv"], r=4, alpha=8.0)],
    "res_attn_prefix4": [ResAttnConfig(r=8, heads=2, prefix_length=4)],
}
# The Res-Tuning family and LoRA start as the pretrained model; SSF, BitFit, linear and full are tested elsewhere.
RES_TUNING_PRESETS = ["lora", "res_adapter", "res_prefix", "res_prompt", "res_lora", "res_attn", "res_tuning"]
CASES = [*RES_TUNING_PRESETS, *EXTRA_CASES]

# Per tuner type: parameters (name inside the tuner) the specs say get a non-zero / an exactly zero gradient at step 0.
NONZERO_AT_STEP0 = {
    "res_adapter": {"up.weight", "up.bias"},
    "res_prefix": {"values"},
    "res_prompt": {"scale.weight"},
    "res_attn": {"out.weight"},
    "lora": {"B"},
    "res_lora": {"B"},
}
ZERO_AT_STEP0 = {
    "res_adapter": {"down.weight", "down.bias", "scale.weight"},  # W_up = b_up = 0: the branch and its inputs
    "res_prefix": {"keys", "scale.weight"},  # V^ = 0
    "res_prompt": {"tokens"},  # s = 0
    "res_attn": {"query.weight", "key.weight", "value.weight", "prefix", "scale.weight"},  # B_o = 0
    "lora": {"A"},
    "res_lora": {"A", "scale.weight"},  # B = 0
}


def tuner_configs(case: str) -> list[TunerConfig]:
    if case in EXTRA_CASES:
        return copy.deepcopy(EXTRA_CASES[case])
    return resolve_spec(case).tuners


def make_spec(case: str, head: str = "train") -> restune.TuneSpec:
    return restune.TuneSpec(tuners=tuner_configs(case), head=head)


def tuned(case: str, head: str = "train", seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(tuned model, an untouched copy of the same model before tune)."""
    model = make_vit(seed)
    before = copy.deepcopy(model)
    restune.tune(model, make_spec(case, head))
    return model, before


def cotangent_loss(logits: Tensor, seed: int = 7) -> Tensor:
    return (logits * randn_like(logits, seed)).sum()


def tuner_param_ids(model: nn.Module, set_name: str = "default") -> set[int]:
    return {id(p) for p in model.restune.sets[set_name].tuners.parameters()}


def head_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.get_classifier().parameters()}


def named_tuner_params(model: nn.Module, set_name: str = "default") -> list[tuple[str, Tensor]]:
    return list(model.restune.sets[set_name].tuners.named_parameters())


# ---------------------------------------------------------------------------------------------------------------
# Initialisation, gradients at step 0, and what a training step may touch.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(EXTRA_CASES))  # the presets: test_contract.py (exact start)
def test_tuned_model_starts_as_the_pretrained_model(case: str) -> None:
    model, before = tuned(case)
    images = make_images()
    with torch.no_grad():
        torch.testing.assert_close(model(images), before(images), atol=1e-5, rtol=0.0)


@pytest.mark.parametrize("case", CASES)
def test_step0_gradients_follow_the_spec_and_sgd_moves_the_logits(case: str) -> None:
    model, _ = tuned(case, head="freeze")
    images = make_images()
    before = model(images)
    cotangent_loss(before).backward()
    checked_nonzero = 0
    for key, tuner in model.restune.sets["default"].named_tuners():
        kind = tuner.config.type
        params = dict(tuner.named_parameters())
        for name in NONZERO_AT_STEP0[kind]:
            assert params[name].grad is not None, f"{key}.{name} got no gradient"
            assert params[name].grad.abs().max() > 0, f"{key}.{name} got a zero gradient at step 0"
            checked_nonzero += 1
        for name in ZERO_AT_STEP0[kind] & params.keys():
            grad = params[name].grad
            assert grad is None or not grad.any(), f"{key}.{name} should get a zero gradient at step 0"
    assert checked_nonzero > 0
    assert model.head.weight.grad is None and not model.head.weight.requires_grad
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.optim.SGD(trainable, lr=0.1).step()
    with torch.no_grad():
        after = model(images)
    assert (after - before.detach()).abs().max() > 1e-4


def frozen_snapshot(model: nn.Module, include_head: bool) -> dict[str, Tensor]:
    head = classifier_path(model)
    state = {}
    for name, value in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("restune."):
            continue
        if not include_head and (name == head or name.startswith(f"{head}.")):
            continue
        state[name] = value.detach().clone()
    return state


@pytest.mark.parametrize("head", ["train", "freeze"])
@pytest.mark.parametrize("case", list(EXTRA_CASES))  # the presets: test_contract.py (one AdamW step, both heads)
def test_adamw_step_touches_only_the_active_set(case: str, head: str) -> None:
    model, _ = tuned(case, head=head)
    trains_head = head == "train"
    expected = tuner_param_ids(model) | (head_param_ids(model) if trains_head else set())
    requires_grad = {id(p) for p in model.parameters() if p.requires_grad}
    assert requires_grad == expected
    frozen = frozen_snapshot(model, include_head=not trains_head)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    cotangent_loss(model(make_images())).backward()
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == expected
    optimizer.step()
    for name, value in [*model.named_parameters(), *model.named_buffers()]:
        if name in frozen:
            assert torch.equal(value, frozen[name]), f"frozen tensor {name} changed"
