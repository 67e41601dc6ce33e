"""Parity with the official implementations: the shipped fixtures, fixtures of other shapes made here with real peft,
and restune's LoRA against live peft outputs and gradients (docs/fixtures.md §2a)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FIXTURES, make_images, make_vit, randn_like
from safetensors.torch import load_file, save_file
from torch import nn

import restune
from restune.tuners import LoraConfig

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

Tensor = torch.Tensor
SHIPPED = sorted(p.stem for p in FIXTURES.glob("*.json") if p.stem in restune.parity.supported_fixtures())


def copy_fixture(stem: str, directory: Path, new_stem: str | None = None) -> Path:
    base = directory / (new_stem or stem)
    shutil.copy(FIXTURES / f"{stem}.json", base.with_suffix(".json"))
    shutil.copy(FIXTURES / f"{stem}.safetensors", base.with_suffix(".safetensors"))
    return base


def edit_fixture(base: Path, meta_change: dict[str, Any] | None = None, tensors: dict[str, Tensor] | None = None):
    if meta_change:
        meta = json.loads(base.with_suffix(".json").read_text())
        meta.update(meta_change)
        base.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    if tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(base.with_suffix(".safetensors")))


# ---------------------------------------------------------------------------------------------------------------
# The shipped fixtures.
# ---------------------------------------------------------------------------------------------------------------


def test_the_two_wave_one_fixtures_are_shipped_and_supported() -> None:
    assert {"restuning_res_adapter", "lora_vit_peft"} <= set(SHIPPED)


@pytest.mark.parametrize("stem", SHIPPED)
def test_shipped_fixture_passes_within_its_tolerance(stem: str) -> None:
    meta = json.loads((FIXTURES / f"{stem}.json").read_text())
    result = restune.parity.check(FIXTURES / stem)
    assert result["passed"], result["failures"]
    assert result["failures"] == []
    assert 0.0 <= result["max_abs_err"] <= meta["tolerance"]["outputs"]["atol"]
    assert 0.0 <= result["max_abs_err_grads"] <= meta["tolerance"]["grads"]["atol"]
    expected = {k for k in meta["outputs"]} | {k for k in meta["grads"]}
    assert set(result["errors"]) == expected


@pytest.mark.parametrize("suffix", ["", ".json", ".safetensors"])
def test_check_accepts_the_path_with_or_without_suffix(suffix: str) -> None:
    assert restune.parity.check(str(FIXTURES / "restuning_res_adapter") + suffix)["passed"]


PERTURB = {
    "restuning_res_adapter": "tuner.up_proj.bias",
    "lora_vit_peft": "tuner.blocks.0.attn.qkv.lora_B",
}


@pytest.mark.parametrize("stem", sorted(PERTURB))
def test_tolerance_is_read_from_the_fixture_json(tmp_path: Path, stem: str) -> None:
    base = copy_fixture(stem, tmp_path)
    tensors = load_file(str(base.with_suffix(".safetensors")))
    key = PERTURB[stem]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1e-2
    edit_fixture(base, tensors=tensors)
    strict = restune.parity.check(base)
    assert not strict["passed"]
    assert strict["failures"]
    assert strict["max_abs_err"] > json.loads(base.with_suffix(".json").read_text())["tolerance"]["outputs"]["atol"]

    loose = {"outputs": {"atol": 1.0, "rtol": 0.0}, "grads": {"atol": 1.0, "rtol": 0.0}}
    edit_fixture(base, meta_change={"tolerance": loose})
    relaxed = restune.parity.check(base)
    assert relaxed["passed"], relaxed["failures"]
    assert relaxed["max_abs_err"] == pytest.approx(strict["max_abs_err"])

    # Tightening the tolerance of the unperturbed fixture below its observed error makes it fail.
    (tmp_path / "clean").mkdir()
    clean = copy_fixture(stem, tmp_path / "clean")
    observed = restune.parity.check(clean)
    worst = max(observed["max_abs_err"], observed["max_abs_err_grads"])
    if worst > 0:
        tight = {"outputs": {"atol": worst / 4, "rtol": 0.0}, "grads": {"atol": worst / 4, "rtol": 0.0}}
        edit_fixture(clean, meta_change={"tolerance": tight})
        assert not restune.parity.check(clean)["passed"]


def test_unknown_stem_raises_value_error(tmp_path: Path) -> None:
    base = copy_fixture("restuning_res_adapter", tmp_path)
    edit_fixture(base, meta_change={"name": "no_such_method"})
    with pytest.raises(ValueError, match="no_such_method"):
        restune.parity.check(base)
    unnamed = copy_fixture("restuning_res_adapter", tmp_path, new_stem="other_stem")
    meta = json.loads(unnamed.with_suffix(".json").read_text())
    del meta["name"]
    unnamed.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="other_stem"):
        restune.parity.check(unnamed)


def test_stem_comes_from_the_json_name_not_the_file_name(tmp_path: Path) -> None:
    base = copy_fixture("lora_vit_peft", tmp_path, new_stem="renamed_copy")
    assert restune.parity.check(base)["passed"]


def test_missing_fixture_file_raises(tmp_path: Path) -> None:
    base = copy_fixture("restuning_res_adapter", tmp_path)
    base.with_suffix(".safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        restune.parity.check(base)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures of other shapes, made here with real peft.
# ---------------------------------------------------------------------------------------------------------------


def peft_model(vit: nn.Module, targets: list[str], r: int, alpha: float, rslora: bool = False) -> nn.Module:
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora)
    model = peft.get_peft_model(copy.deepcopy(vit), config)
    model.base_model.model.get_classifier().requires_grad_(True)  # as the fixtures do, to get the head's gradient
    return model.eval()


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Dotted timm name (e.g. ``blocks.0.attn.qkv``) -> peft's LoRA layer."""
    base = model.base_model.model
    return {name: m for name, m in base.named_modules() if isinstance(m, peft.tuners.lora.layer.Linear)}


def randomize_lora(model: nn.Module, seed: int) -> None:
    with torch.no_grad():
        for offset, layer in enumerate(lora_layers(model).values()):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.copy_(randn_like(a, seed + 2 * offset, std=a.shape[1] ** -0.5))
            b.copy_(randn_like(b, seed + 2 * offset + 1, std=(0.25 / b.shape[1]) ** 0.5))


def write_peft_fixture(
    directory: Path, vit_kwargs: dict[str, int], r: int, alpha: float, seed: int = 0, batch: int = 2
) -> Path:
    """A ``lora_vit_peft`` fixture made as the shipped one: real peft on a timm ViT, same tensor names and JSON keys."""
    shipped = json.loads((FIXTURES / "lora_vit_peft.json").read_text())
    vit = make_vit(seed, **vit_kwargs)
    model = peft_model(vit, ["qkv"], r, alpha)
    randomize_lora(model, seed + 500)
    images = make_images(seed + 1, batch=batch, size=vit_kwargs["img_size"])
    logits = model(images)
    cotangent = randn_like(logits, seed + 2)
    (logits * cotangent).sum().backward()

    t: dict[str, Tensor] = {f"frozen.{k}": v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    sources: dict[str, Tensor] = {
        "tuner.head.weight": model.base_model.model.head.weight,
        "tuner.head.bias": model.base_model.model.head.bias,
    }
    merged: dict[str, Tensor] = {}
    for name, layer in lora_layers(model).items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        sources[f"tuner.{name}.lora_A"], sources[f"tuner.{name}.lora_B"] = a, b
        merged[f"outputs.{name}.merged_weight"] = layer.base_layer.weight + layer.scaling["default"] * b @ a
    t.update({k: v.detach() for k, v in sources.items()})
    t.update({f"grads.{k}": v.grad for k, v in sources.items()})
    t.update({k: v.detach() for k, v in merged.items()})
    t.update({"inputs.images": images, "inputs.cotangent": cotangent, "outputs.logits": logits.detach()})
    t = {k: v.detach().to(torch.float32).contiguous() for k, v in t.items()}

    meta = copy.deepcopy(shipped)
    meta["config"]["vit"].update(vit_kwargs)
    meta["config"]["vit"]["mlp_hidden"] = vit_kwargs["embed_dim"] * vit_kwargs["mlp_ratio"]
    meta["config"]["vit"]["num_patches"] = (vit_kwargs["img_size"] // vit_kwargs["patch_size"]) ** 2
    meta["config"].update(batch=batch, r=r, lora_alpha=alpha, scaling=alpha / r)
    meta["tolerance"] = {"outputs": {"atol": 1e-5, "rtol": 1e-4}, "grads": {"atol": 1e-4, "rtol": 1e-4}}
    for group in ("frozen", "tuner", "inputs", "outputs", "grads"):
        meta[group] = {k: f"{k} (generated by the test)" for k in t if k.split(".")[0] == group}
    meta["shapes"] = {k: list(v.shape) for k, v in sorted(t.items())}
    meta["official_names"] = {k: f"base_model.model.{k[len('tuner.') :]}" for k in t if k.startswith("tuner.")}
    meta["seed"], meta["fixture_set"] = seed, "generated-in-test"
    assert set(meta) == set(shipped), "the generated JSON must have the shipped fixture's keys"

    base = directory / "lora_vit_peft"
    save_file(t, str(base.with_suffix(".safetensors")))
    base.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return base


def test_generated_peft_fixture_of_another_shape_passes(tmp_path: Path) -> None:
    vit_kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 6, "mlp_ratio": 2,
                  "num_classes": 4}  # fmt: skip
    base = write_peft_fixture(tmp_path, vit_kwargs, r=2, alpha=4.0, seed=3, batch=3)
    assert load_file(str(base.with_suffix(".safetensors")))["tuner.blocks.2.attn.qkv.lora_B"].shape == (144, 2)
    result = restune.parity.check(base)
    assert result["passed"], result["failures"]
    assert result["max_abs_err"] <= 1e-5
    assert result["max_abs_err_grads"] <= 1e-4
    assert "grads.tuner.blocks.2.attn.qkv.lora_A" in result["errors"]

    # The generated fixture is sensitive: scaling by alpha instead of alpha / r fails it.
    meta = json.loads(base.with_suffix(".json").read_text())
    meta["config"]["lora_alpha"] = 8.0
    base.with_suffix(".json").write_text(json.dumps(meta))
    assert not restune.parity.check(base)["passed"]


@pytest.mark.parametrize(
    ("targets", "r", "alpha", "rslora"),
    [(["qkv"], 4, 8.0, False), (["qkv", "fc1", "attn.proj"], 3, 5.0, True)],
    ids=["qkv", "qkv_fc1_proj_rslora"],
)
def test_lora_matches_live_peft(targets: list[str], r: int, alpha: float, rslora: bool) -> None:
    vit = make_vit(2)
    reference = peft_model(vit, targets, r, alpha, rslora)
    randomize_lora(reference, seed=77)

    model = copy.deepcopy(vit)
    restune.tune(model, restune.TuneSpec([LoraConfig(sites=targets, r=r, alpha=alpha, use_rslora=rslora)]))
    ours = dict(model.restune.sets["default"].named_tuners())
    theirs = lora_layers(reference)
    assert {k.rsplit(".", 1)[0] for k in ours} == set(theirs)
    with torch.no_grad():
        for name, layer in theirs.items():
            ours[f"{name}.lora"].A.copy_(layer.lora_A["default"].weight)
            ours[f"{name}.lora"].B.copy_(layer.lora_B["default"].weight)

    images = make_images(9, batch=3).requires_grad_(True)
    images_ref = images.detach().clone().requires_grad_(True)
    logits, logits_ref = model(images), reference(images_ref)
    assert (logits_ref - vit(images).detach()).abs().max() > 1e-3, "the LoRA values must matter in this test"
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-4)
    cotangent = randn_like(logits, 10)
    (logits * cotangent).sum().backward()
    (logits_ref * cotangent).sum().backward()
    for name, layer in theirs.items():
        tuner, a, b = ours[f"{name}.lora"], layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(tuner.A.grad, a.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(tuner.B.grad, b.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(tuner.delta_weight(), layer.scaling["default"] * b @ a)
    head_ref = reference.base_model.model.head
    torch.testing.assert_close(model.head.weight.grad, head_ref.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.head.bias.grad, head_ref.bias.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(images.grad, images_ref.grad, atol=1e-5, rtol=1e-4)
