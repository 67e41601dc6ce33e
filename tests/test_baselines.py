"""The baselines of docs/methods/baselines.md: VPT, NOAH's adapter, AdaptFormer, prefix, linear probe, full tuning.

Each method's output is checked against a reference written out here from the spec's equations, with the backbone's
hooks switched off (``restune.disabled``), so the bindings (token, sequential, parallel, joined softmax) are tested
against the math rather than against themselves. What every preset shares (the start, one training step, merge or its
refusal, save/load, bf16, deepcopy) is checked in test_contract.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT, make_images, make_vit, randomize_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

import restune
from restune.spec import resolve_spec
from restune.tune import get_store
from restune.tuners.lora import LoraConfig
from restune.tuners.prefix_tuning import PrefixTuningConfig
from restune.tuners.vpt import VPTConfig

SMALL = {"vpt_shallow": VPTConfig(layers=[0], length=3), "vpt_deep": VPTConfig(length=3)}


def small_spec(preset: str, head: str = "train") -> restune.TuneSpec:
    """The preset's spec, with 3 prompt tokens for VPT so the tiny model stays tiny."""
    spec = resolve_spec(preset)
    if preset in SMALL:
        spec.tuners = [SMALL[preset]]
    spec.head = head
    return spec


def tuned(preset: str, head: str = "train", seed: int = 0) -> nn.Module:
    model = make_vit(seed)
    restune.tune(model, small_spec(preset, head))
    randomize_([(n, p) for n, p in model.restune.named_parameters()], seed=7, std=0.3)
    return model


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(..., N, H*d) -> (..., H, N, d)."""
    *lead, n, width = t.shape
    return t.reshape(*lead, n, heads, width // heads).transpose(-3, -2)


def reference_block(block: nn.Module, x: Tensor, tuners: dict[str, nn.Module]) -> Tensor:
    """A timm pre-LN block in eval mode, with the baselines' equations written out (hooks must be off)."""
    attn = block.attn
    u = block.norm1(x)
    q, k, v = (split_heads(t, attn.num_heads) for t in attn.qkv(u).chunk(3, dim=-1))
    if "prefix" in tuners:
        batch = x.shape[0]
        extra_k = split_heads(tuners["prefix"].keys, attn.num_heads).expand(batch, -1, -1, -1)
        extra_v = split_heads(tuners["prefix"].values, attn.num_heads).expand(batch, -1, -1, -1)
        k, v = torch.cat([extra_k, k], dim=2), torch.cat([extra_v, v], dim=2)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    o = (weights @ v).transpose(1, 2).flatten(2)
    x = x + attn.proj(o)
    u2 = block.norm2(x)
    m = block.mlp(u2)
    if "adapter" in tuners:  # NOAH: m + QuickGELU(m W_down + b_down) W_up + b_up
        a = tuners["adapter"]
        z = F.linear(m, a.down.weight, a.down.bias)
        m = m + F.linear(z * torch.sigmoid(1.702 * z), a.up.weight, a.up.bias)
    if "adaptformer" in tuners:  # mlp(u2) + 0.1 (ReLU(u2 W_down + b_down) W_up + b_up)
        a = tuners["adaptformer"]
        m = m + 0.1 * F.linear(F.relu(F.linear(u2, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
    return x + m


def reference_logits(model: nn.Module, images: Tensor) -> Tensor:
    """VPT-shallow/deep, adapter, AdaptFormer and prefix tuning from the spec, reading the model's tuner tensors."""
    per_block: dict[int, dict[str, nn.Module]] = {}
    for key, tuner in model.restune.sets["default"].named_tuners():
        per_block.setdefault(int(key.split(".")[1]), {})[tuner.config.type] = tuner
    head = model.head
    with restune.disabled(model):
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        inserted = 0
        for index, block in enumerate(model.blocks):
            vpt = per_block.get(index, {}).get("vpt")
            if vpt is not None:  # after the class token; the first prompted block inserts, later ones replace
                prompts = vpt.prompts.expand(len(images), -1, -1)
                x = torch.cat([x[:, :1], prompts, x[:, 1 + inserted :]], dim=1)
                inserted = prompts.shape[1]
            x = reference_block(block, x, per_block.get(index, {}))
        x = model.norm(x)
    return F.linear(x[:, 0], head.weight, head.bias)


@pytest.mark.parametrize("preset", ["vpt_shallow", "vpt_deep", "adapter", "adaptformer", "prefix"])
def test_forward_matches_the_spec_equations(preset: str) -> None:
    model, images = tuned(preset), make_images(3)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference_logits(model, images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["vpt_shallow", "vpt_deep"])
def test_vpt_keeps_forward_features_shape_and_gradients_reach_every_prompt(preset: str) -> None:
    model, images = tuned(preset), make_images(3)
    features = model.forward_features(images)
    assert features.shape == (2, 1 + 16, 32)  # class token + 4x4 patches, no prompt tokens
    model.forward_head(features).sum().backward()
    for _, tuner in model.restune.sets["default"].named_tuners():
        assert tuner.prompts.grad is not None and tuner.prompts.grad.abs().sum() > 0


def test_vpt_inserts_after_register_tokens() -> None:
    model = make_vit(0, reg_tokens=2)
    restune.tune(model, restune.TuneSpec([VPTConfig(length=3)]))
    assert model.forward_features(make_images(3)).shape == (2, 1 + 2 + 16, 32)


@pytest.mark.parametrize(
    ("options", "problem"),
    [({"global_pool": "avg"}, "global_pool='avg'"), ({"class_token": False, "global_pool": "avg"}, "no class token")],
)
def test_vpt_refuses_models_without_class_token_pooling(options: dict, problem: str) -> None:
    model = VisionTransformer(**TINY_VIT, **options)
    with pytest.raises(ValueError, match=problem):
        restune.tune(model, "vpt_deep")
    assert get_store(model) is None  # refused before anything was attached


def test_vpt_refuses_two_prompt_lengths_in_one_set() -> None:
    spec = restune.TuneSpec([VPTConfig(layers=[0], length=3), VPTConfig(layers=[1], length=4)])
    with pytest.raises(ValueError, match="one prompt length"):
        restune.tune(make_vit(0), spec)


def test_vpt_deep_block_run_alone_raises_clearly() -> None:
    model = tuned("vpt_deep")
    x = torch.zeros(2, 17, 32)
    with pytest.raises(RuntimeError, match="run the model from its input"):
        model.blocks[1](x)


def test_prefix_joins_the_qkv_that_lora_changed() -> None:
    # LoRA on q and v changes what the joined attention reads; merging LoRA into the weights must give the same logits.
    model = make_vit(0)
    restune.tune(model, restune.TuneSpec([PrefixTuningConfig(length=4), LoraConfig(r=2)]))
    randomize_([(n, p) for n, p in model.restune.named_parameters()], seed=3, std=0.3)
    images = make_images(3)
    with torch.no_grad():
        before = model(images)
        restune.merge(model, partial=True)
        torch.testing.assert_close(model(images), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["vpt_shallow", "vpt_deep", "adapter", "prefix"])
def test_methods_that_do_not_start_at_the_pretrained_model(preset: str) -> None:
    model = make_vit(0)
    images = make_images(3)
    with torch.no_grad():
        expected = model(images)
        restune.tune(model, small_spec(preset))
        assert not torch.allclose(model(images), expected)
        with restune.disabled(model):
            assert torch.equal(model(images), expected)
