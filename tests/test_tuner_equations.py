"""Tuner forwards against from-scratch references of the equations in docs/methods, on a tiny timm ViT.

A reference ViT forward with a hook per binding reproduces timm, and each Res-Tuning tuner's output is checked
against its equation (docs/methods/res-tuning.md §3-6, res-attn.md); several tuners on one op add up (§7); a float64
gradcheck covers the attention-branch and Res-Attn backward passes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import make_images, make_vit, randomize_
from torch import nn

import restune
from restune.tuners import (
    LoraConfig,
    ResAdapterConfig,
    ResAttnConfig,
    ResLoraConfig,
    ResPrefixConfig,
    ResPromptConfig,
    TunerConfig,
)

pytestmark = pytest.mark.usefixtures("single_thread")

Tensor = torch.Tensor
LayerFn = Callable[[int, Tensor], Tensor]


def named_tuner_params(model: nn.Module, set_name: str = "default") -> list[tuple[str, Tensor]]:
    return list(model.restune.sets[set_name].tuners.named_parameters())


# ---------------------------------------------------------------------------------------------------------------
# A from-scratch ViT forward with hooks for each binding, used as the reference of the specs' equations.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Extras:
    """Terms a reference forward adds; each callable receives the block index and what the spec says it reads.

    qkv_delta(i, u1): added to the fused qkv output (the backbone's own attention uses it).
    proj_delta(i, O): added to the proj output, reading proj's input O (the heads concatenated).
    attn_branch(i, Q): added to the attention output; Q (B, H, N, d_h) is the *frozen* query projection.
    attn_add(i, u1) / mlp_add(i, u2) / block_add(i, x): parallel terms on the attn, mlp and block sites.
    """

    qkv_delta: LayerFn | None = None
    proj_delta: LayerFn | None = None
    attn_branch: LayerFn | None = None
    attn_add: LayerFn | None = None
    mlp_add: LayerFn | None = None
    block_add: LayerFn | None = None


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(..., N, H*d) -> (..., H, N, d)."""
    *lead, n, width = t.shape
    return t.reshape(*lead, n, heads, width // heads).transpose(-3, -2)


def merge_heads(t: Tensor) -> Tensor:
    """(..., H, N, d) -> (..., N, H*d)."""
    *lead, h, n, d = t.shape
    return t.transpose(-3, -2).reshape(*lead, n, h * d)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def reference_logits(model: nn.Module, images: Tensor, extras: Extras | None = None) -> Tensor:
    """The tiny ViT computed from its frozen tensors with explicit softmax attention, plus ``extras``."""
    e = extras or Extras()
    pe = model.patch_embed.proj
    x = F.conv2d(images, pe.weight, pe.bias, stride=pe.stride).flatten(2).transpose(1, 2)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    width = x.shape[-1]
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        x_in = x
        u = F.layer_norm(x, (width,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        qkv = F.linear(u, attn.qkv.weight, attn.qkv.bias)
        q_frozen = split_heads(qkv[..., :width], attn.num_heads)
        if e.qkv_delta is not None:
            qkv = qkv + e.qkv_delta(i, u)
        q, k, v = (split_heads(t, attn.num_heads) for t in qkv.split(width, dim=-1))
        o = merge_heads(softmax_attention(q, k, v))
        a = F.linear(o, attn.proj.weight, attn.proj.bias)
        if e.proj_delta is not None:
            a = a + e.proj_delta(i, o)
        if e.attn_branch is not None:
            a = a + e.attn_branch(i, q_frozen)
        if e.attn_add is not None:
            a = a + e.attn_add(i, u)
        x = x + a
        u2 = F.layer_norm(x, (width,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        m = F.linear(F.gelu(F.linear(u2, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        if e.mlp_add is not None:
            m = m + e.mlp_add(i, u2)
        x = x + m
        if e.block_add is not None:
            x = x + e.block_add(i, x_in)
    x = F.layer_norm(x, (width,), model.norm.weight, model.norm.bias, model.norm.eps)
    return F.linear(x[:, 0], model.head.weight, model.head.bias)


def tuners_at(model: nn.Module, suffix: str, set_name: str = "default") -> dict[int, nn.Module]:
    """Block index -> tuner whose key ends with ``suffix`` (e.g. ``attn.res_prefix``)."""
    found = {}
    for key, tuner in model.restune.sets[set_name].named_tuners():
        if key.endswith(suffix):
            found[int(key.split(".")[1])] = tuner
    assert found, f"no tuner ending in {suffix}"
    return found


def scaled(scale: nn.Module, branch: Tensor) -> Tensor:
    """s * branch for the learnable ``scale`` / ``scale_channel`` options (s from the tuner's own tensor)."""
    return branch * scale.weight


def prefix_branch_reference(model: nn.Module, tuners: dict[int, nn.Module]) -> LayerFn:
    """res-tuning.md §4: s * [P_1 ... P_H] W_o, P_h = softmax(Q_h K^_h^T / sqrt(d_h)) V^_h, frozen W_o, no b_o."""

    def branch(i: int, q: Tensor) -> Tensor:
        tuner, attn = tuners[i], model.blocks[i].attn
        heads = q.shape[1]
        keys, values = split_heads(tuner.keys, heads), split_heads(tuner.values, heads)
        p = merge_heads(softmax_attention(q, keys, values))
        return scaled(tuner.scale, p @ attn.proj.weight.T)

    return branch


def prompt_branch_reference(model: nn.Module, tuners: dict[int, nn.Module]) -> LayerFn:
    """docs/methods/res-tuning.md §5: K_p = P W_k + b_k, V_p = P W_v + b_v through the frozen projections."""

    def branch(i: int, q: Tensor) -> Tensor:
        tuner, attn = tuners[i], model.blocks[i].attn
        heads, width = q.shape[1], attn.proj.in_features
        w, b = attn.qkv.weight, attn.qkv.bias
        k_p = tuner.tokens @ w[width : 2 * width].T + b[width : 2 * width]
        v_p = tuner.tokens @ w[2 * width :].T + b[2 * width :]
        p = merge_heads(softmax_attention(q, split_heads(k_p, heads), split_heads(v_p, heads)))
        return scaled(tuner.scale, p @ attn.proj.weight.T)

    return branch


def res_attn_reference(tuners: dict[int, nn.Module], heads: int) -> LayerFn:
    """res-attn.md: s * [o_1 ... o_h] B_o, q = u A_q, k = u A_k (or T A_k), v = u A_v (or T A_v), no biases."""

    def branch(i: int, u: Tensor) -> Tensor:
        t = tuners[i]
        source = u if t.prefix is None else t.prefix
        q = split_heads(u @ t.query.weight.T, heads)
        k = split_heads(source @ t.key.weight.T, heads)
        v = split_heads(source @ t.value.weight.T, heads)
        return scaled(t.scale, merge_heads(softmax_attention(q, k, v)) @ t.out.weight.T)

    return branch


def low_rank_reference(tuners: dict[int, nn.Module], factor: Callable[[nn.Module], Tensor | float]) -> LayerFn:
    def delta(i: int, x: Tensor) -> Tensor:
        t = tuners[i]
        return factor(t) * (x @ t.A.T @ t.B.T)

    return delta


def qkv_rows(part: str, delta: LayerFn) -> LayerFn:
    """Place a q/k/v row-block delta at its columns of the fused qkv output."""
    index = "qkv".index(part)

    def placed(i: int, u: Tensor) -> Tensor:
        d = delta(i, u)
        zeros = torch.zeros_like(d)
        return torch.cat([d if j == index else zeros for j in range(3)], dim=-1)

    return placed


def sum_of(*fns: LayerFn) -> LayerFn:
    def total(i: int, x: Tensor) -> Tensor:
        return sum((fn(i, x) for fn in fns), torch.zeros(()))

    return total


def randomized(model: nn.Module, seed: int = 11) -> nn.Module:
    randomize_(named_tuner_params(model), seed)
    return model


def assert_matches_reference(model: nn.Module, extras: Extras) -> None:
    images = make_images()
    with torch.no_grad():
        actual = model(images)
        expected = reference_logits(model, images, extras)
        untuned = reference_logits(model, images)
    assert (expected - untuned).abs().max() > 1e-3, "the tuners should change the logits in this test"
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_reference_forward_reproduces_timm() -> None:
    model = make_vit(0)
    images = make_images()
    with torch.no_grad():
        torch.testing.assert_close(reference_logits(model, images), model(images), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scale", ["scale", "scale_channel"])
@pytest.mark.parametrize("with_proj_lora", [False, True], ids=["shared_wo", "proj_res_lora"])
def test_res_prefix_matches_spec_reference(scale: str, with_proj_lora: bool) -> None:
    configs: list[TunerConfig] = [ResPrefixConfig(length=5, scale=scale)]
    if with_proj_lora:
        configs.append(ResLoraConfig(sites=["attn.proj"], r=3))
    model = make_vit(0)
    restune.tune(model, restune.TuneSpec(configs))
    randomized(model)
    extras = Extras(attn_branch=prefix_branch_reference(model, tuners_at(model, "attn.res_prefix")))
    if with_proj_lora:
        extras.proj_delta = low_rank_reference(tuners_at(model, "attn.proj.res_lora"), lambda t: t.scale.weight)
    assert_matches_reference(model, extras)


@pytest.mark.parametrize("order", ["prefix_first", "lora_first", "lora_in_earlier_set"])
@pytest.mark.parametrize("lora_type", ["lora", "res_lora"])
def test_res_prefix_uses_the_frozen_query_when_q_carries_a_weight_delta(lora_type: str, order: str) -> None:
    lora = LoraConfig(sites=["attn.q"], r=2, alpha=3.0) if lora_type == "lora" else ResLoraConfig(sites=["attn.q"], r=2)
    prefix = ResPrefixConfig(length=4)
    model = make_vit(0)
    if order == "lora_in_earlier_set":  # the qkv output hook exists before the attention host is created
        restune.tune(model, lora, name="earlier")
    configs: list[TunerConfig] = [prefix, lora] if order == "prefix_first" else [lora, prefix]
    restune.tune(model, restune.TuneSpec(configs))
    randomize_(named_tuner_params(model), seed=21, std=0.5)
    prefix = tuners_at(model, "attn.res_prefix")
    lora_tuners = tuners_at(model, f"attn.q.{lora_type}")
    factor = (lambda t: 3.0 / 2) if lora_type == "lora" else (lambda t: t.scale.weight)
    extras = Extras(
        qkv_delta=qkv_rows("q", low_rank_reference(lora_tuners, factor)),
        attn_branch=prefix_branch_reference(model, prefix),
    )
    assert_matches_reference(model, extras)
    # The same reference with the branch reading q + delta must differ: the test can tell the two apart.
    images = make_images()
    with torch.no_grad():
        wrong = reference_logits(model, images, Extras(qkv_delta=extras.qkv_delta))
        assert (model(images) - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("with_proj_lora", [False, True], ids=["shared_wo", "proj_res_lora"])
def test_res_prompt_matches_spec_reference(with_proj_lora: bool) -> None:
    configs: list[TunerConfig] = [ResPromptConfig(length=6)]
    if with_proj_lora:
        configs.append(ResLoraConfig(sites=["attn.proj"], r=3))
    model = make_vit(0)
    restune.tune(model, restune.TuneSpec(configs))
    randomized(model)
    for tuner in tuners_at(model, "attn.res_prompt").values():
        assert tuner.scale.weight.item() != 0.0
    extras = Extras(attn_branch=prompt_branch_reference(model, tuners_at(model, "attn.res_prompt")))
    if with_proj_lora:
        extras.proj_delta = low_rank_reference(tuners_at(model, "attn.proj.res_lora"), lambda t: t.scale.weight)
    assert_matches_reference(model, extras)


@pytest.mark.parametrize(
    ("site", "prefix_length"),
    [("attn", 0), ("attn", 4), ("mlp", 0), ("block", 0)],
)
def test_res_attn_matches_spec_reference(site: str, prefix_length: int) -> None:
    pattern = {"attn": r"blocks\.\d+\.attn", "mlp": r"blocks\.\d+\.mlp", "block": r"blocks\.\d+"}[site]
    model = make_vit(0)
    restune.tune(model, ResAttnConfig(sites=pattern, r=8, heads=2, prefix_length=prefix_length))
    randomized(model)
    suffix = {"attn": "attn.res_attn", "mlp": "mlp.res_attn", "block": "res_attn"}[site]
    fn = res_attn_reference(tuners_at(model, suffix), heads=2)
    extras = Extras(**{f"{site}_add": fn})
    assert_matches_reference(model, extras)


def test_lora_split_q_v_equals_the_merged_weight_model() -> None:
    model = make_vit(0)
    merged = copy.deepcopy(model)
    restune.tune(model, LoraConfig(r=4, alpha=6.0))  # sites: attn.q and attn.v
    randomize_(named_tuner_params(model), seed=5, std=0.5)
    width = model.embed_dim
    with torch.no_grad():
        for i, blk in enumerate(merged.blocks):
            for part, rows in (("q", slice(0, width)), ("v", slice(2 * width, 3 * width))):
                tuner = dict(model.restune.sets["default"].named_tuners())[f"blocks.{i}.attn.{part}.lora"]
                blk.attn.qkv.weight[rows] += (6.0 / 4) * tuner.B @ tuner.A
                torch.testing.assert_close(tuner.delta_weight(), (6.0 / 4) * tuner.B @ tuner.A)
    images = make_images()
    with torch.no_grad():
        actual, expected, base = model(images), merged(images), make_vit(0)(images)
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Several tuners on one op are summed (docs/methods/res-tuning.md §7).
# ---------------------------------------------------------------------------------------------------------------


def adapter_reference(tuner: nn.Module, u: Tensor) -> Tensor:
    """docs/methods/res-tuning.md §3: s * (GELU(u W_down + b_down) W_up + b_up)."""
    hidden = F.gelu(F.linear(u, tuner.down.weight, tuner.down.bias))
    return scaled(tuner.scale, F.linear(hidden, tuner.up.weight, tuner.up.bias))


def test_two_adapters_on_one_mlp_add_their_outputs() -> None:
    model = make_vit(0)
    spec = [ResAdapterConfig(sites=["blocks.0.mlp"], dim=4), ResAdapterConfig(sites=["blocks.0.mlp"], dim=6)]
    restune.tune(model, spec)
    randomized(model)
    tuners = dict(model.restune.sets["default"].named_tuners())
    assert set(tuners) == {"blocks.0.mlp.res_adapter", "blocks.0.mlp.res_adapter_1"}
    first, second = tuners["blocks.0.mlp.res_adapter"], tuners["blocks.0.mlp.res_adapter_1"]
    seen: dict[str, Tensor] = {}
    mlp = model.blocks[0].mlp
    handles = [
        mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("u", args[0])),
        mlp.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out)),
    ]
    images = make_images()
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    u, out = seen["u"], seen["out"]
    with torch.no_grad():
        with restune.disabled(model):
            base = mlp(u)
        r1, r2 = adapter_reference(first, u), adapter_reference(second, u)
    assert r1.abs().max() > 1e-2 and r2.abs().max() > 1e-2
    with torch.no_grad():
        torch.testing.assert_close(first(u), r1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, base + r1 + r2, atol=1e-5, rtol=1e-4)

    def both_on_block0(i: int, u: Tensor) -> Tensor:
        return adapter_reference(first, u) + adapter_reference(second, u) if i == 0 else torch.zeros_like(u)

    extras = Extras(mlp_add=both_on_block0)
    with torch.no_grad():
        torch.testing.assert_close(logits, reference_logits(model, images, extras), atol=1e-5, rtol=1e-4)


def test_prefix_adapter_and_res_attn_on_one_attention_add_their_outputs() -> None:
    model = make_vit(0)
    spec = [
        ResPrefixConfig(length=3),
        ResAdapterConfig(sites=r"blocks\.\d+\.attn", dim=5, scale="scale_channel"),
        ResAttnConfig(r=4, heads=2),
    ]
    restune.tune(model, spec)
    randomized(model)
    adapters = tuners_at(model, "attn.res_adapter")
    extras = Extras(
        attn_branch=prefix_branch_reference(model, tuners_at(model, "attn.res_prefix")),
        attn_add=sum_of(
            lambda i, u: adapter_reference(adapters[i], u), res_attn_reference(tuners_at(model, "attn.res_attn"), 2)
        ),
    )
    assert_matches_reference(model, extras)


# ---------------------------------------------------------------------------------------------------------------
# float64 gradient checks through the hooks.
# ---------------------------------------------------------------------------------------------------------------


def tiny_double_vit() -> nn.Module:
    return make_vit(3, dtype=torch.float64, img_size=16, patch_size=8, embed_dim=8, num_heads=2, depth=1, mlp_ratio=1)


@pytest.mark.parametrize(
    "config",
    [
        ResPrefixConfig(length=3),
        ResPrefixConfig(length=3, scale="scale_channel"),
        ResPromptConfig(length=3, scale_init=0.8),
        ResAttnConfig(r=4, heads=2),
        ResAttnConfig(r=4, heads=2, prefix_length=2),
    ],
    ids=["res_prefix", "res_prefix_channel", "res_prompt", "res_attn", "res_attn_prefix"],
)
def test_gradcheck_float64(config: TunerConfig) -> None:
    model = tiny_double_vit()
    restune.tune(model, config)
    randomize_(named_tuner_params(model), seed=9, std=0.5)
    names = [n for n, _ in model.named_parameters() if n.startswith("restune.")]
    params = dict(model.named_parameters())
    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    images = make_images(4, batch=1, size=16, dtype=torch.float64).requires_grad_(True)

    def fn(x: Tensor, *values: Tensor) -> Tensor:
        return torch.func.functional_call(model, dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (images, *inputs), eps=1e-6, atol=1e-6, rtol=1e-4)
