"""The tuner contract (restune.contract), checked over every registered tuner type and every preset.

The cases come from the registries when pytest collects this file: every tuner type with its config's defaults
(``type:<name>``), every preset ``restune.tune`` takes (``preset:<name>``) and every Bypass preset
(``bypass:<name>``). A new tuner or preset is covered by registering it; nothing here lists them.

Behaviour runs on the tiny ViT of conftest.py (32 px, D 32, depth 2) on the CPU; counts, the import graph and the
drop-in tuner are in test_contract_registry.py. The published ViT-B numbers stay in test_counts.py, the
method-specific properties (parity, equations, initialisations) in the method files.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from conftest import make_images, make_vit
from contract_cases import (
    ALL_CASES,
    BYPASS_CASES,
    NUM_CLASSES,
    STEP_CASES,
    TUNER_CASES,
    adamw_step,
    build,
    expected_trainable,
    logits,
    no_warnings,
    perturb_,
    snapshot,
    spec_of,
    starts_exactly,
    trainable,
    tuner_keys,
    tuner_tensors,
)

import restune
import restune.tuners
from restune.sites import STORE_ATTR
from restune.spec import TuneSpec
from restune.tune import get_store, match_backbone
from restune.tuners import LoraConfig, ResPrefixConfig

pytestmark = pytest.mark.usefixtures("single_thread")

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------------------------
# Behaviour on the tiny ViT.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", TUNER_CASES)
def test_starts_at_the_pretrained_model_or_disabled_restores_it(case: str) -> None:
    images = make_images()
    untuned = logits(make_vit(0), images)
    model, spec = build(case)
    if starts_exactly(model):
        assert torch.equal(logits(model, images), untuned), f"{case} promises to start at the pretrained model"
    perturb_(trainable(model), seed=11)  # tuners, head and trained backbone tensors all away from their start
    tuned = logits(model, images)
    assert not torch.equal(tuned, untuned)
    with restune.disabled(model):
        assert torch.equal(logits(model, images), untuned)
    assert torch.equal(logits(model, images), tuned), "leaving disabled() did not restore the tuned model"


@pytest.mark.parametrize("case", BYPASS_CASES)
def test_a_bypass_leaves_its_backbone_as_it_was(case: str) -> None:
    images = make_images()
    backbone = make_vit(0)
    before = snapshot(backbone)
    untuned = logits(backbone, images)
    bypass, _ = build(case, backbone=backbone)
    assert isinstance(bypass, restune.Bypass) and bypass.backbone is backbone
    out = logits(bypass, images)
    assert out.shape == (len(images), NUM_CLASSES) and bool(torch.isfinite(out).all())
    assert torch.equal(logits(bypass.backbone, images), untuned)
    assert all(torch.equal(t, before[name]) for name, t in snapshot(bypass.backbone).items())
    assert not any(p.requires_grad for p in bypass.backbone.parameters())


@pytest.mark.parametrize(("case", "head"), STEP_CASES)
def test_one_adamw_step_moves_exactly_the_trainable_tensors(case: str, head: str) -> None:
    """Only what the spec trains requires grad, gets a gradient and moves; every other parameter and buffer stays.

    A trainable tensor may stay put only when it is zero and its gradient vanishes, so that neither the gradient nor
    weight decay can move it (AdaptFormer's down-projection bias behind W_up = 0; RLRR's key-bias shift, which softmax
    ignores, when its gradient rounds to exactly zero).
    """
    images = make_images()
    untuned = logits(make_vit(0), images)
    spec = spec_of(case)
    if head == "freeze" and isinstance(spec, TuneSpec) and not spec.tuners and not spec.train:
        spec.head = "freeze"  # nothing left to train: the spec is refused before the model changes
        with pytest.raises(ValueError, match="trains nothing"):
            restune.tune(make_vit(0), spec)
        return
    model, spec = build(case, head=None if head == "spec" else head)
    expected = expected_trainable(model, spec)
    assert expected and set(trainable(model)) == expected
    before = snapshot(model)
    tuned = logits(model, images)
    grads = adamw_step(model, images)
    assert {name for name, grad in grads.items() if grad is not None} == expected, "gradients reach other tensors"
    after = snapshot(model)
    changed = {name for name, value in after.items() if not torch.equal(value, before[name])}
    assert changed - expected == set(), "tensors outside the spec changed"
    stayed = {name for name in expected - changed if grads[name].abs().max() > 0 or before[name].abs().max() > 0}
    assert stayed == set(), "trainable tensors with a gradient or a non-zero value (weight decay) did not move"
    assert not torch.allclose(logits(model, images), tuned), "the step did not change the output"
    if not isinstance(model, restune.Bypass):
        with restune.disabled(model):
            assert torch.equal(logits(model, images), untuned)


@pytest.mark.parametrize("case", ALL_CASES)
def test_save_and_load_into_a_fresh_model_round_trip(case: str, tmp_path: Path) -> None:
    images = make_images()
    model, _ = build(case)
    perturb_(trainable(model), seed=21)
    expected = logits(model, images)
    restune.save(model, tmp_path / "ckpt")
    fresh = make_vit(0)
    assert not torch.equal(logits(fresh, images), expected)
    with no_warnings():
        loaded = restune.load(fresh, tmp_path / "ckpt")
    assert type(loaded) is type(model)
    assert torch.equal(logits(loaded, images), expected)
    assert snapshot(loaded).keys() == snapshot(model).keys()
    saved, restored = trainable(model), trainable(loaded)
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[name], value) for name, value in saved.items())
    if isinstance(model, restune.Bypass):
        assert loaded.backbone is fresh and loaded.config == model.config
    else:
        assert loaded is fresh and get_store(loaded).active == "default"
        assert tuner_keys(loaded) == tuner_keys(model)


@pytest.mark.parametrize("case", ALL_CASES)
def test_merged_equals_unmerged_where_mergeable(case: str, tmp_path: Path) -> None:
    """Where every tuner declares ``mergeable``, merge folds them (a plain timm model, same outputs) and unmerge
    restores exactly; otherwise merge refuses and changes nothing."""
    images = make_images()
    model, spec = build(case)
    perturb_(trainable(model), seed=31)
    expected = logits(model, images)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if isinstance(model, restune.Bypass):
        with pytest.raises(ValueError, match="does not merge"):
            restune.merge(model)
        return
    tuners = get_store(model).sets["default"].named_tuners()
    if not all(tuner.mergeable for _, tuner in tuners):
        with pytest.raises(ValueError, match="not mergeable"):
            restune.merge(model)
        assert hasattr(model, STORE_ATTR)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        return
    result = restune.merge(model)
    assert not result.skipped and len(result.merged) == len(tuners) and bool(result.weights) == bool(tuners)
    assert sorted(result.kept) == sorted(match_backbone(make_vit(0), spec.train))
    torch.testing.assert_close(logits(model, images), expected, atol=1e-5, rtol=0.0)
    assert not hasattr(model, STORE_ATTR)
    assert all(type(m).__module__.split(".")[0] in ("timm", "torch") for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    torch.save(model.state_dict(), tmp_path / "merged.pth")
    plain = make_vit(9)
    timm.models.load_checkpoint(plain, str(tmp_path / "merged.pth"))
    torch.testing.assert_close(logits(plain, images), expected, atol=1e-5, rtol=0.0)
    restune.unmerge(model)
    assert torch.equal(logits(model, images), expected)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no merge"):
        restune.unmerge(model)


@pytest.mark.parametrize("case", ALL_CASES)
def test_bf16_forward_is_finite_and_close_to_fp32(case: str) -> None:
    images = make_images()
    model, _ = build(case)
    perturb_(trainable(model), seed=41)
    expected = logits(model, images)
    model.to(torch.bfloat16)
    out = logits(model, images.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.float(), expected, atol=0.05 * (1.0 + expected.abs().max().item()), rtol=0.0)


@pytest.mark.parametrize("case", ALL_CASES)
def test_deepcopy_gives_the_same_outputs_and_independent_tensors(case: str) -> None:
    images = make_images()
    untuned = logits(make_vit(0), images)
    model, _ = build(case)
    perturb_(trainable(model), seed=51)
    expected = logits(model, images)
    clone = copy.deepcopy(model)
    assert torch.equal(logits(clone, images), expected)
    ours = {t.data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel()}
    assert not ours & {t.data_ptr() for t in [*clone.parameters(), *clone.buffers()] if t.numel()}
    perturb_(tuner_tensors(clone), seed=52)  # the copy's own tuners drive the copy ...
    assert not torch.equal(logits(clone, images), expected)
    assert torch.equal(logits(model, images), expected)  # ... and leave the original alone
    if not isinstance(model, restune.Bypass):
        with restune.disabled(clone):
            assert torch.equal(logits(clone, images), untuned)


def test_deepcopy_of_an_attention_branch_beside_a_tuned_projection() -> None:
    """A combination no single preset has: an attention-branch tuner plus a tuner on ``attn.proj``.

    The hosts were once keyed by ``id(module)``, so a copy looked its hosts up under the original's ids.
    """
    model = restune.tune(make_vit(0), TuneSpec([ResPrefixConfig(), LoraConfig(sites=["attn.proj"])]))
    perturb_(trainable(model), seed=71)
    images = make_images()
    assert torch.equal(logits(copy.deepcopy(model), images), logits(model, images))
