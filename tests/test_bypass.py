"""Res-Tuning-Bypass and MultiTask: parity, the no-gradient property, exact pruning, options, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import FIXTURES, make_images, make_vit, randomize_

import restune
from restune import Bypass, BypassConfig, MultiTask
from restune.backbones import block_features


def _randomized(bypass: Bypass, seed: int = 7) -> Bypass:
    """Non-trivial values everywhere, so equalities are not satisfied by zeros."""
    randomize_([(n, p) for n, p in bypass.named_parameters() if not n.startswith("backbone.")], seed, std=0.2)
    return bypass


def _grads(bypass: Bypass) -> list[torch.Tensor]:
    # A tuner that cannot reach the output (e.g. an early lateral when the vertical branch is zero) has no gradient.
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in bypass.trainable_parameters()]


def test_parity_with_swift_fixture() -> None:
    result = restune.parity.check(FIXTURES / "restuning_bypass_vit")
    assert result["passed"], result["failures"]
    assert result["max_abs_err"] < 1e-5 and result["max_abs_err_grads"] < 2e-5


def test_preset_count_on_vit_b_and_learnable_lambda() -> None:
    with torch.device("meta"):
        backbone = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    head = 769 * 100
    assert sum(p.numel() for p in Bypass(backbone, num_classes=100).trainable_parameters()) - head == 1_198_848
    learnable = Bypass(backbone, BypassConfig(mixing="learnable"), num_classes=100)
    assert sum(p.numel() for p in learnable.trainable_parameters()) - head == 1_198_848 + 12
    narrow = Bypass(backbone, BypassConfig(bottleneck=[8] * 6, blocks=[6, 7, 8, 9, 10, 11]), num_classes=100)
    assert sum(p.numel() for p in narrow.trainable_parameters()) - head == 6 * 2 * (2 * 768 * 8 + 8 + 768)
    vertical_off = Bypass(backbone, BypassConfig(vertical="zero"), num_classes=100)
    assert sum(p.numel() for p in vertical_off.trainable_parameters()) - head == 12 * 49_952


@pytest.mark.parametrize(("depth", "width"), [(12, 768), (5, 128), (3, 192)])
def test_attn_preset_count_equals_the_formula(depth: int, width: int) -> None:
    with torch.device("meta"):
        backbone = timm.create_model(
            "vit_base_patch16_224", pretrained=False, depth=depth, embed_dim=width, num_heads=4, num_classes=10
        )
    bypass = Bypass(backbone, "res_tuning_bypass_attn", num_classes=10)
    lateral, vertical = 4 * width * 16 + 1, 2 * width * 32 + 32 + width
    head = (width + 1) * 10
    assert sum(p.numel() for p in bypass.trainable_parameters()) - head == depth * (lateral + vertical)
    assert bypass.token_mode == "query"
    if depth == 12:
        assert depth * (lateral + vertical) == 1_189_260
    counted = restune.report(bypass)  # the Bypass's own head is the head, not the backbone's
    assert counted.head == head and counted.trainable_without_head == depth * (lateral + vertical)


def test_no_gradient_or_graph_reaches_the_backbone() -> None:
    backbone = make_vit(0).requires_grad_(True)
    bypass = _randomized(Bypass(backbone, num_classes=5))
    assert all(not p.requires_grad for p in backbone.parameters())
    images = make_images().requires_grad_(True)
    features = bypass.features(images)
    assert all(not f.requires_grad and f.grad_fn is None for f in features.values())
    bypass(images).square().sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert images.grad is None
    assert all(p.grad is not None for p in bypass.trainable_parameters())


def test_backbone_stays_in_eval_and_is_never_saved() -> None:
    backbone = make_vit(0)
    bypass = Bypass(backbone, num_classes=5).train()
    assert bypass.training and not backbone.training
    state = bypass.state_dict()
    assert state and not any(k.startswith("backbone.") for k in state)
    other = Bypass(make_vit(0), num_classes=5)
    assert other.load_state_dict(state, strict=True).missing_keys == []


def test_inert_bypass_gives_norm_of_summed_block_features() -> None:
    backbone = make_vit(0, depth=3)
    bypass = _randomized(Bypass(backbone, BypassConfig(prune_tokens=False), num_classes=5))
    with torch.no_grad():
        for step in bypass.bypass:
            for tuner in (step.lateral, step.vertical):
                tuner.up_proj.weight.zero_()
                tuner.up_proj.bias.zero_()
    images = make_images()
    features = block_features(backbone, images, bypass.keys)
    with torch.no_grad():
        state = bypass.forward_features(features)
        torch.testing.assert_close(state, sum(features.values()), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(backbone.norm(state), backbone.norm(sum(features.values())), atol=1e-5, rtol=1e-5)


def test_lateral_only_inert_bypass_reproduces_timm_logits() -> None:
    backbone = make_vit(0)
    bypass = Bypass(backbone, BypassConfig(vertical="zero"), num_classes=5)
    with torch.no_grad():
        for step in bypass.bypass:
            step.lateral.up_proj.weight.zero_()
            step.lateral.up_proj.bias.zero_()
        bypass.head.load_state_dict(backbone.head.state_dict())
        images = make_images()
        assert torch.equal(bypass(images), backbone(images))


@pytest.mark.parametrize(
    "spec",
    [
        BypassConfig(),
        BypassConfig(mixing="learnable"),
        BypassConfig(lateral={"type": "res_adapter", "dim": 4}, vertical={"type": "lora", "r": 2}),
    ],
)
def test_class_token_pruning_is_exact(spec: BypassConfig) -> None:
    backbone = make_vit(0)
    pruned = _randomized(Bypass(backbone, spec, num_classes=5))
    full_spec = BypassConfig(**{**spec.__dict__, "prune_tokens": False})
    full = Bypass(backbone, full_spec, num_classes=5)
    full.load_state_dict(pruned.state_dict())
    assert pruned.token_mode == "class" and full.token_mode == "all"
    images = make_images()
    out_pruned, out_full = pruned(images), full(images)
    torch.testing.assert_close(out_pruned, out_full, atol=1e-6, rtol=0)
    out_pruned.sum().backward()
    out_full.sum().backward()
    for a, b in zip(_grads(pruned), _grads(full), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("spec", "mode"),
    [
        ({"lateral": {"type": "res_attn", "r": 8, "heads": 2}}, "query"),
        ({"lateral": {"type": "res_attn", "r": 8, "heads": 2, "scale": "gate"}}, "all"),
        ({"vertical": {"type": "res_attn", "r": 8, "heads": 2}}, "all"),
        ({"scale": "gate"}, "all"),
        ({"vertical": "zero", "lateral": {"type": "res_attn", "r": 8, "heads": 2}}, "query"),
    ],
)
def test_token_modes_equal_the_all_token_computation(spec: dict, mode: str) -> None:
    backbone = make_vit(0)
    pruned = _randomized(Bypass(backbone, spec, num_classes=5))
    full = Bypass(backbone, {**spec, "prune_tokens": False, "recompute": False}, num_classes=5)
    full.load_state_dict(pruned.state_dict())
    assert pruned.token_mode == mode and full.token_mode == "all"
    images = make_images()
    out_pruned, out_full = pruned(images), full(images)
    torch.testing.assert_close(out_pruned, out_full, atol=1e-6, rtol=0)
    out_pruned.square().sum().backward()
    out_full.square().sum().backward()
    for a, b in zip(_grads(pruned), _grads(full), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_all_token_recompute_is_bitwise_exact() -> None:
    backbone = make_vit(0)
    spec = {"vertical": {"type": "res_attn", "r": 8, "heads": 2}}
    lean = _randomized(Bypass(backbone, spec, num_classes=5))
    plain = Bypass(backbone, {**spec, "recompute": False}, num_classes=5)
    plain.load_state_dict(lean.state_dict())
    assert lean.token_mode == "all" and lean.mixes_tokens
    with pytest.raises(ValueError, match="not exact"):
        Bypass(backbone, {**spec, "prune_tokens": True}, num_classes=5).prunes_tokens  # noqa: B018
    images = make_images()
    out_lean, out_plain = lean(images), plain(images)
    assert torch.equal(out_lean, out_plain)
    out_lean.square().sum().backward()
    out_plain.square().sum().backward()
    for a, b in zip(_grads(lean), _grads(plain), strict=True):
        assert torch.equal(a, b)


def test_fixed_lambda_mixing() -> None:
    backbone = make_vit(0)
    mixed = _randomized(Bypass(backbone, BypassConfig(mixing="fixed", lam=0.3, prune_tokens=False), num_classes=5))
    features = block_features(backbone, make_images(), mixed.keys)
    expected = features[0]
    with torch.no_grad():
        for key, step in zip(mixed.keys[1:], mixed.bypass, strict=True):
            expected = 0.3 * step.lateral(features[key]) + 0.7 * step.vertical(expected)
        torch.testing.assert_close(mixed.forward_features(features), expected, atol=1e-6, rtol=1e-6)


def test_chunked_backbone_forward_gives_the_same_features() -> None:
    backbone = make_vit(0)
    images = make_images(batch=5)
    keys = list(range(3))
    whole = block_features(backbone, images, keys)
    chunked = block_features(backbone, images, keys, chunk_size=2)
    for key in keys:
        torch.testing.assert_close(chunked[key], whole[key], atol=1e-6, rtol=1e-6)


def test_bad_configs_fail_clearly() -> None:
    backbone = make_vit(0)
    with pytest.raises(ValueError, match="both 'zero'"):
        BypassConfig(lateral="zero", vertical="zero")
    with pytest.raises(ValueError, match="is None"):
        BypassConfig(lateral=None)
    with pytest.raises(ValueError, match="bottleneck widths"):
        Bypass(backbone, BypassConfig(bottleneck=[4, 4, 4]), num_classes=5)
    with pytest.raises(ValueError, match="unknown bypass preset"):
        Bypass(backbone, "nope", num_classes=5)
    with pytest.raises(ValueError, match="not to a token sequence"):
        Bypass(backbone, BypassConfig(lateral={"type": "res_prefix"}), num_classes=5)
    with pytest.raises(ValueError, match="blocks"):
        Bypass(backbone, BypassConfig(blocks=[5]), num_classes=5)


def test_multitask_equals_each_bypass_alone() -> None:
    backbone = make_vit(0)
    tasks = {
        "a": _randomized(Bypass(backbone, num_classes=5), 1),
        "b": _randomized(Bypass(backbone, BypassConfig(blocks=[1]), num_classes=3), 2),
        "c": _randomized(Bypass(backbone, {"lateral": {"type": "res_attn", "r": 4, "heads": 2}}, num_classes=4), 3),
    }
    multi = MultiTask(backbone, tasks)
    images = make_images(batch=3)
    outputs = multi(images)
    assert set(outputs) == {"a", "b", "c"}
    assert all(o.is_inference() for o in outputs.values())
    for name, task in tasks.items():
        torch.testing.assert_close(outputs[name], task(images).detach(), atol=1e-6, rtol=0)
    removed = multi.remove("c")
    assert removed is tasks["c"] and set(multi(images)) == {"a", "b"}
    multi.add("c", removed)
    assert not any(k.startswith("backbone.") or ".backbone." in k for k in multi.state_dict())
    with pytest.raises(ValueError, match="another backbone"):
        multi.add("d", Bypass(make_vit(0), num_classes=5))
    with pytest.raises(ValueError, match="exists"):
        multi.add("a", tasks["a"])


def test_save_and_load_a_single_bypass(tmp_path: Path) -> None:
    backbone = make_vit(0)
    bypass = _randomized(Bypass(backbone, BypassConfig(mixing="learnable", bottleneck=6), num_classes=4))
    restune.save(bypass, tmp_path / "task")
    images = make_images()
    expected = bypass(images)
    fresh_backbone = make_vit(0)
    loaded = restune.load(fresh_backbone, tmp_path / "task")
    assert isinstance(loaded, Bypass) and loaded.backbone is fresh_backbone
    assert torch.equal(loaded(images), expected)
    again = Bypass(make_vit(0), BypassConfig(mixing="learnable", bottleneck=6), num_classes=4)
    assert restune.load(again, tmp_path / "task") is again
    assert torch.equal(again(images), expected)
    with pytest.raises(ValueError, match="another config"):
        restune.load(Bypass(make_vit(0), num_classes=4), tmp_path / "task")
    with pytest.raises(ValueError, match="was made for"):
        restune.load(make_vit(0, depth=3), tmp_path / "task")
    with pytest.warns(UserWarning, match="frozen weights"):
        restune.load(make_vit(1), tmp_path / "task")
