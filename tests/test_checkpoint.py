"""Tuner-only checkpoints, named tuner sets, ``disabled()`` and trained backbone tensors."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import make_images, make_vit, randn_like, randomize_
from safetensors.torch import load_file, save_file
from torch import nn

import restune
from restune.tuners import ResAdapterConfig

pytestmark = pytest.mark.usefixtures("single_thread")

Tensor = torch.Tensor


@contextmanager
def no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_steps(model: nn.Module, data_seed: int, steps: int = 2, lr: float = 0.05) -> None:
    """A few AdamW steps on the active set, with a cotangent loss on images drawn from ``data_seed``."""
    optimizer = torch.optim.AdamW(trainable(model), lr=lr)
    for step in range(steps):
        images = make_images(data_seed + step)
        logits = model(images)
        loss = (logits * randn_like(logits, data_seed + 1000 + step)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def logits_of(model: nn.Module, seed: int = 100) -> Tensor:
    with torch.no_grad():
        return model(make_images(seed))


def trained_model(preset: str = "res_tuning", seed: int = 0) -> nn.Module:
    """A tuned tiny ViT with every trainable tensor (tuners and head) at random non-trivial values."""
    model = make_vit(seed)
    restune.tune(model, preset)
    randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed=33, std=0.3)
    return model


def rewrite_weights(directory: Path, tensors: dict[str, Tensor], fix_checksum: bool) -> None:
    """Replace tuners.safetensors; optionally update ``weights_sha256`` in tuners.json so the checksum passes."""
    weights = directory / "tuners.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights))
    if fix_checksum:
        meta = json.loads((directory / "tuners.json").read_text())
        meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        (directory / "tuners.json").write_text(json.dumps(meta, indent=2))


# ---------------------------------------------------------------------------------------------------------------
# Round trips and the file layout.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["already_tuned"])  # into a fresh model: test_contract.py, every preset
@pytest.mark.parametrize("preset", restune.presets())
def test_round_trip_reproduces_logits_exactly(tmp_path: Path, preset: str, target: str) -> None:
    source = trained_model(preset)
    expected = logits_of(source)
    restune.save(source, tmp_path)
    model = make_vit(0)
    if target == "already_tuned":
        restune.tune(model, preset)
    assert not torch.equal(logits_of(model), expected)
    with no_warnings():
        restune.load(model, tmp_path)
    assert torch.equal(logits_of(model), expected)
    assert model.restune.active == "default"
    assert [k for k, _ in model.restune.sets["default"].named_tuners()] == [
        k for k, _ in source.restune.sets["default"].named_tuners()
    ]


def test_checkpoint_directory_holds_exactly_two_files(tmp_path: Path) -> None:
    model = trained_model("res_tuning")
    returned = restune.save(model, tmp_path / "ckpt")
    directory = tmp_path / "ckpt"
    assert Path(returned) == directory
    assert sorted(p.name for p in directory.iterdir()) == ["tuners.json", "tuners.safetensors"]
    meta = json.loads((directory / "tuners.json").read_text())
    for key in ("format_version", "architecture", "fingerprint", "spec"):
        assert key in meta, key
    assert meta["format_version"] == 1
    assert meta["architecture"]["embed_dim"] == 32 and meta["architecture"]["depth"] == 2
    assert [t["type"] for t in meta["spec"]["tuners"]] == ["res_prefix", "res_adapter"]
    tensors = load_file(str(directory / "tuners.safetensors"))
    expected = {f"tuners.{k}" for k, _ in model.restune.sets["default"].tuners.named_parameters()}
    assert set(tensors) == expected | {"head.weight", "head.bias"}
    assert not any(k.startswith("backbone.") or k.endswith("qkv.weight") for k in tensors)
    assert meta["weights_sha256"] == hashlib.sha256((directory / "tuners.safetensors").read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Load errors: each names the problem, and a refused load leaves the model as it was.
# ---------------------------------------------------------------------------------------------------------------


def assert_untouched(model: nn.Module, logits: Tensor) -> None:
    """A model that was never tuned is still untuned after a refused load: no store, nothing frozen, same logits."""
    assert not hasattr(model, "restune"), "a refused load attached tuners"
    assert all(p.requires_grad for p in model.parameters()), "a refused load froze the backbone"
    assert torch.equal(logits_of(model), logits)


ADAPTER_UP = "tuners.blocks.0.mlp.res_adapter.up.weight"


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = trained_model("res_adapter")
    return restune.save(model, tmp_path / "ckpt")


def test_missing_tensor_raises_naming_it(saved: Path) -> None:
    tensors = load_file(str(saved / "tuners.safetensors"))
    del tensors[ADAPTER_UP]
    rewrite_weights(saved, tensors, fix_checksum=True)
    model = make_vit(0)
    untuned = logits_of(model)
    with pytest.raises(ValueError, match=r"missing in checkpoint: \['tuners\.blocks\.0\.mlp\.res_adapter\.up\.weight'"):
        restune.load(model, saved)
    assert_untouched(model, untuned)


def test_unexpected_tensor_raises_naming_it(saved: Path) -> None:
    tensors = load_file(str(saved / "tuners.safetensors"))
    tensors["tuners.blocks.0.mlp.res_adapter.extra"] = torch.zeros(3)
    rewrite_weights(saved, tensors, fix_checksum=True)
    model = make_vit(0)
    untuned = logits_of(model)
    with pytest.raises(ValueError, match=r"unexpected in checkpoint: \['tuners\.blocks\.0\.mlp\.res_adapter\.extra'"):
        restune.load(model, saved)
    assert_untouched(model, untuned)


def test_misshaped_tensor_raises_naming_it(saved: Path) -> None:
    tensors = load_file(str(saved / "tuners.safetensors"))
    tensors[ADAPTER_UP] = tensors[ADAPTER_UP][:, :-1].clone()
    rewrite_weights(saved, tensors, fix_checksum=True)
    model = make_vit(0)
    untuned = logits_of(model)
    with pytest.raises(ValueError, match=r"shape mismatch: .*tuners\.blocks\.0\.mlp\.res_adapter\.up\.weight"):
        restune.load(model, saved)
    assert_untouched(model, untuned)


def test_refused_load_keeps_the_existing_sets(saved: Path) -> None:
    tensors = load_file(str(saved / "tuners.safetensors"))
    del tensors[ADAPTER_UP]
    rewrite_weights(saved, tensors, fix_checksum=True)
    model = make_vit(0)
    restune.tune(model, "lora", name="mine")
    tuned = logits_of(model)
    with pytest.raises(ValueError, match="missing in checkpoint"):
        restune.load(model, saved)
    assert list(model.restune.sets) == ["mine"] and model.restune.active == "mine"
    assert torch.equal(logits_of(model), tuned)


def test_torn_checkpoint_raises(saved: Path) -> None:
    tensors = load_file(str(saved / "tuners.safetensors"))
    tensors[ADAPTER_UP] = tensors[ADAPTER_UP] + 1.0
    rewrite_weights(saved, tensors, fix_checksum=False)
    with pytest.raises(ValueError, match="checksum"):
        restune.load(make_vit(0), saved)


@pytest.mark.parametrize("change", [{"depth": 3}, {"embed_dim": 48}], ids=["depth", "embed_dim"])
def test_other_architecture_raises_clearly(saved: Path, change: dict[str, int]) -> None:
    model = make_vit(0, **change)
    untuned = logits_of(model)
    with pytest.raises(ValueError, match=r"made for .*embed_dim 32, depth 2.*but this model is"):
        restune.load(model, saved)
    assert_untouched(model, untuned)


def test_other_num_classes_raises_naming_the_head(saved: Path) -> None:
    model = make_vit(0, num_classes=7)
    untuned = logits_of(model)
    with no_warnings(), pytest.raises(ValueError, match=r"head\.weight.*num_classes"):
        restune.load(model, saved)
    assert_untouched(model, untuned)


def test_other_frozen_weights_warn_or_raise_when_strict(saved: Path) -> None:
    with pytest.warns(UserWarning, match="frozen weights"):
        restune.load(make_vit(1), saved)
    model = make_vit(1)
    untuned = logits_of(model)
    with pytest.raises(ValueError, match="frozen weights"):
        restune.load(model, saved, strict=True)
    assert_untouched(model, untuned)


def test_loading_into_a_set_built_from_other_configs_raises(saved: Path) -> None:
    model = make_vit(0)
    restune.tune(model, "lora")
    restune.tune(model, "res_prompt", name="other")
    tuned = logits_of(model)
    with pytest.raises(ValueError, match="other configs"):
        restune.load(model, saved)
    assert model.restune.active == "other"
    assert torch.equal(logits_of(model), tuned)
    with pytest.raises(ValueError, match="other configs"):
        restune.load(restune.tune(make_vit(0), ResAdapterConfig(dim=3)), saved)


# ---------------------------------------------------------------------------------------------------------------
# Named sets, each with its own head.
# ---------------------------------------------------------------------------------------------------------------


def test_named_sets_keep_their_own_tuners_and_heads(tmp_path: Path) -> None:
    model = make_vit(0)
    untuned = logits_of(model)
    restune.tune(model, "lora", name="a")
    restune.tune(model, "res_adapter", name="b")
    assert model.restune.active == "b"
    assert {id(p) for p in trainable(model)} == {
        *map(id, model.restune.sets["b"].tuners.parameters()),
        *map(id, model.head.parameters()),
    }

    restune.set_active(model, "a")
    b_before = {k: v.detach().clone() for k, v in model.restune.sets["b"].named_parameters()}
    train_steps(model, data_seed=1)
    for name, value in model.restune.sets["b"].named_parameters():
        assert torch.equal(value, b_before[name]), f"training set a changed set b's {name}"
    logits_a = logits_of(model)
    head_a = model.head.weight.detach().clone()

    restune.set_active(model, "b")
    train_steps(model, data_seed=50)
    logits_b = logits_of(model)
    head_b = model.head.weight.detach().clone()

    assert not torch.equal(head_a, head_b)
    assert not torch.equal(logits_a, logits_b)
    for name in ("a", "b", "a", "b", "a"):
        restune.set_active(model, name)
        assert torch.equal(logits_of(model), logits_a if name == "a" else logits_b), name
        assert torch.equal(model.head.weight, head_a if name == "a" else head_b), name

    restune.set_active(model, "b")
    with restune.disabled(model):
        assert torch.equal(logits_of(model), untuned)
    assert torch.equal(logits_of(model), logits_b)

    restune.save(model, tmp_path / "a", name="a")
    assert model.restune.active == "b"
    assert torch.equal(logits_of(model), logits_b)
    elsewhere = make_vit(0)
    with no_warnings():
        restune.load(elsewhere, tmp_path / "a")
    assert elsewhere.restune.active == "a"
    assert torch.equal(logits_of(elsewhere), logits_a)

    # Loading set a next to another set in a third model keeps that set's own head and logits too.
    third = make_vit(0)
    restune.tune(third, "res_prompt", name="c")
    logits_c = logits_of(third)
    with no_warnings():
        restune.load(third, tmp_path / "a")
    assert torch.equal(logits_of(third), logits_a)
    restune.set_active(third, "c")
    assert torch.equal(logits_of(third), logits_c)


def test_disabled_gives_the_untuned_model_after_training_and_restores() -> None:
    model = make_vit(0)
    untuned = logits_of(model)
    head_before = model.head.weight.detach().clone()
    restune.tune(model, "res_tuning")
    train_steps(model, data_seed=3, steps=3)
    assert not torch.equal(model.head.weight, head_before)
    tuned = logits_of(model)
    assert not torch.equal(tuned, untuned)
    with restune.disabled(model):
        assert torch.equal(logits_of(model), untuned)
        assert torch.equal(model.head.weight, head_before)
    assert torch.equal(logits_of(model), tuned)
    with pytest.raises(RuntimeError, match="boom"), restune.disabled(model):
        raise RuntimeError("boom")
    assert torch.equal(logits_of(model), tuned)


def test_training_the_class_token(tmp_path: Path) -> None:
    model = make_vit(0)
    untuned = logits_of(model)
    original = model.cls_token.detach().clone()
    restune.tune(model, restune.TuneSpec([ResAdapterConfig(dim=4)], train=["cls_token"]))
    assert model.cls_token.requires_grad
    assert not model.pos_embed.requires_grad
    train_steps(model, data_seed=8)
    trained = model.cls_token.detach().clone()
    assert not torch.equal(trained, original)
    tuned = logits_of(model)
    with restune.disabled(model):
        assert torch.equal(model.cls_token, original)
        assert torch.equal(logits_of(model), untuned)
    assert torch.equal(model.cls_token, trained)
    assert torch.equal(logits_of(model), tuned)

    restune.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "tuners.safetensors"))
    assert torch.equal(tensors["backbone.cls_token"], trained)
    elsewhere = make_vit(0)
    with no_warnings():
        restune.load(elsewhere, tmp_path)
    assert torch.equal(elsewhere.cls_token, trained)
    assert torch.equal(logits_of(elsewhere), tuned)
    with restune.disabled(elsewhere):
        assert torch.equal(logits_of(elsewhere), untuned)


def test_class_token_belongs_to_its_set_only(tmp_path: Path) -> None:
    model = make_vit(0)
    original = model.cls_token.detach().clone()
    restune.tune(model, restune.TuneSpec([ResAdapterConfig(dim=4)], train=["cls_token"]), name="with_cls")
    train_steps(model, data_seed=8)
    trained = model.cls_token.detach().clone()
    tuned = logits_of(model)
    restune.tune(model, "res_adapter", name="plain")
    assert torch.equal(model.cls_token, original)
    assert not model.cls_token.requires_grad
    train_steps(model, data_seed=20)
    assert torch.equal(model.cls_token, original)

    restune.save(model, tmp_path, name="with_cls")  # saved while inactive
    assert torch.equal(load_file(str(tmp_path / "tuners.safetensors"))["backbone.cls_token"], trained)
    elsewhere = make_vit(0)
    with no_warnings():
        restune.load(elsewhere, tmp_path)
    assert torch.equal(logits_of(elsewhere), tuned)

    restune.set_active(model, "with_cls")
    assert model.cls_token.requires_grad
    assert torch.equal(model.cls_token, trained)
    assert torch.equal(logits_of(model), tuned)


@pytest.mark.parametrize("active", ["a", "b", "c"])
def test_only_the_active_set_trains_and_gets_gradients(active: str) -> None:
    model = make_vit(0)
    restune.tune(model, "lora", name="a")
    restune.tune(model, restune.TuneSpec([ResAdapterConfig(dim=4)], head="freeze"), name="b")
    restune.tune(model, "res_prefix", name="c")
    restune.set_active(model, active)
    tuner_set = model.restune.sets[active]
    expected = {id(p) for p in tuner_set.tuners.parameters()}
    if tuner_set.trains_head:
        expected |= {id(p) for p in model.head.parameters()}
    assert {id(p) for p in trainable(model)} == expected
    logits = model(make_images())
    (logits * randn_like(logits, 4)).sum().backward()
    assert {id(p) for p in model.parameters() if p.grad is not None} == expected


def test_round_trip_of_a_set_with_a_frozen_head(tmp_path: Path) -> None:
    source = make_vit(0)
    restune.tune(source, restune.TuneSpec([ResAdapterConfig(dim=4)], head="freeze"))
    randomize_(list(source.restune.named_parameters()), seed=2)
    expected = logits_of(source)
    restune.save(source, tmp_path)
    assert not any(k.startswith("head.") for k in load_file(str(tmp_path / "tuners.safetensors")))
    model = make_vit(0)
    with no_warnings():
        restune.load(model, tmp_path)
    assert not model.head.weight.requires_grad
    assert torch.equal(logits_of(model), expected)
