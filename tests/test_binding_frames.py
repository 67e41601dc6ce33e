"""Per-call state of the hosts: an exception in the middle of a forward leaves nothing stale for the next one."""

from __future__ import annotations

import pytest
import torch
from conftest import make_vit

import restune
from restune.tuners import ResPrefixConfig, SSFConfig, VPTConfig


class Boom(RuntimeError):
    pass


def _raise_once(module: torch.nn.Module) -> None:
    """Make the next call of ``module`` raise (after its inputs were computed), then behave normally."""
    state = {"armed": True}

    def hook(mod: torch.nn.Module, args: tuple) -> None:
        if state["armed"]:
            state["armed"] = False
            raise Boom("interrupted")

    module.register_forward_pre_hook(hook)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.restune.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.3)


def test_an_attention_interrupted_inside_proj_leaves_no_injected_branch_behind() -> None:
    # Set "shared": a scalar-scaled Res-Prefix alone, so its branch is injected before proj (the frame's flag).
    # Set "separate": the same plus SSF after proj, so the branch is projected and added after the attention.
    model = make_vit(0).eval()
    restune.tune(model, ResPrefixConfig(length=3), name="shared")
    restune.tune(model, [ResPrefixConfig(length=3), SSFConfig(sites=["attn.proj"])], name="separate")
    for name in ("shared", "separate"):
        restune.set_active(model, name)
        _randomise(model, seed=len(name))
    images = torch.randn(2, 3, 32, 32)
    expected = model(images)

    restune.set_active(model, "shared")
    _raise_once(model.blocks[0].attn.proj)
    with pytest.raises(Boom):
        model(images)
    restune.set_active(model, "separate")
    torch.testing.assert_close(model(images), expected, rtol=0, atol=0)


def test_an_interrupted_forward_with_prompt_tokens_is_followed_by_an_exact_one() -> None:
    model = restune.tune(make_vit(0), VPTConfig(length=4)).eval()
    _randomise(model, seed=1)
    images = torch.randn(2, 3, 32, 32)
    expected = model(images)
    _raise_once(model.blocks[1])
    with pytest.raises(Boom):
        model(images)
    torch.testing.assert_close(model(images), expected, rtol=0, atol=0)
