"""merge / unmerge: equivalence, plain timm after merging, exact undo, and every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import make_images, make_vit, randomize_
from torch import nn

import restune
from restune.merge import merge, unmerge
from restune.spec import TuneSpec
from restune.tuners import LoraConfig, ResAdapterConfig, ResLoraConfig, SSFConfig
from restune.tuners.arc import ARCConfig
from restune.tuners.snell import SnellConfig

MERGEABLE = {
    "lora": "lora",
    "res_lora": "res_lora",
    "res_lora_channel": TuneSpec([ResLoraConfig(scale="scale_channel", sites=["attn.q", "attn.v", "mlp.fc2"])]),
    "lora_fused": TuneSpec([LoraConfig(sites=["attn.qkv", "attn.proj"], r=4)]),
    "ssf": "ssf",
    "bitfit": "bitfit",
    "ssf_and_lora": TuneSpec([LoraConfig(), SSFConfig()]),
    "rlrr": "rlrr",
    "arc": "arc",
    "arc_att": "arc_att",
    "hta": "hta",
    "snell": TuneSpec([SnellConfig(r=4, sparsity=0.5)], train=["cls_token"]),
    "arc_and_lora_on_qkv": TuneSpec([ARCConfig(r=4), LoraConfig(sites=["attn.qkv"], r=2)]),
}


def _tuned(spec: object, seed: int = 5) -> nn.Module:
    model = restune.tune(make_vit(0), spec)
    randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed, std=0.2)
    return model.eval()


# The presets among the cases: test_contract.py checks these properties for every preset.
@pytest.mark.parametrize("case", [case for case, spec in MERGEABLE.items() if not isinstance(spec, str)])
def test_merged_model_equals_tuned_model_and_is_plain_timm(case: str, tmp_path: Path) -> None:
    model = _tuned(MERGEABLE[case])
    images = make_images()
    with torch.no_grad():
        expected = model(images)
    result = merge(model)
    assert not result.skipped
    assert result.merged and result.weights
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)
    assert not hasattr(model, "restune")
    assert all(type(m).__module__.split(".")[0] in ("timm", "torch") for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    path = tmp_path / "merged.pth"
    torch.save(model.state_dict(), path)
    fresh = make_vit(9)
    timm.models.load_checkpoint(fresh, str(path))
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["ssf_and_lora"])  # the presets (lora, bitfit...): test_contract.py
def test_unmerge_restores_bitwise(case: str) -> None:
    model = _tuned(MERGEABLE[case])
    images = make_images()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(images)
    merge(model)
    unmerge(model)
    with torch.no_grad():
        assert torch.equal(model(images), before)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_state[key]), key
    with pytest.raises(ValueError, match="no merge"):
        unmerge(model)


def test_partial_merge_folds_the_mergeable_and_reports_the_rest() -> None:
    model = _tuned(TuneSpec([LoraConfig(), ResAdapterConfig()]))
    images = make_images()
    with torch.no_grad():
        expected = model(images)
    with pytest.raises(ValueError, match="not mergeable: res_adapter at blocks.0.mlp"):
        merge(model)
    result = merge(model, partial=True)
    assert all(name.startswith("lora") for name in result.merged)
    assert all(name.startswith("res_adapter") for name in result.skipped)
    remaining = {t.config.type for _, t in model.restune.sets["default"].named_tuners()}
    assert remaining == {"res_adapter"}
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)
    unmerge(model)
    with torch.no_grad():
        assert torch.equal(model(images), expected)
    assert {t.config.type for _, t in model.restune.sets["default"].named_tuners()} == {"lora", "res_adapter"}


def test_nan_in_a_merged_weight_changes_nothing() -> None:
    model = _tuned("lora")
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    tuner = model.restune.sets["default"].named_tuners()[0][1]
    with torch.no_grad():
        tuner.B[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        merge(model)
    assert hasattr(model, "restune")
    for key, value in model.state_dict().items():
        if "restune" not in key:
            assert torch.equal(value, snapshot[key]), key


def test_refusals() -> None:
    with pytest.raises(ValueError, match="no restune tuners"):
        merge(make_vit(0))
    two = restune.tune(restune.tune(make_vit(0), "lora"), "ssf", name="b")
    with pytest.raises(ValueError, match="one tuner set"):
        merge(two)
    with pytest.raises(ValueError, match="Bypass"):
        merge(restune.Bypass(make_vit(0), num_classes=5))
    for preset in ("res_prefix", "res_prompt", "res_attn"):
        with pytest.raises(ValueError, match=f"not mergeable: {preset}"):
            merge(_tuned(preset))


def test_merge_in_low_precision_computes_in_fp32() -> None:
    model = restune.tune(make_vit(0, dtype=torch.bfloat16), "lora")
    randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], 5, std=0.2)
    tuners = dict(model.restune.sets["default"].named_tuners())
    weight = model.blocks[0].attn.qkv.weight.detach().float().clone()
    delta = tuners["blocks.0.attn.q.lora"].B.float() @ tuners["blocks.0.attn.q.lora"].A.float()
    merge(model)
    expected = weight[:32] + delta
    assert torch.equal(model.blocks[0].attn.qkv.weight[:32], expected.to(torch.bfloat16))


def test_merge_on_vit_b() -> None:
    torch.manual_seed(0)
    model = restune.tune(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10).eval(), "rlrr")
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(images)
    merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)
    assert not hasattr(model, "restune")
