"""The shipped restune_vit_tiny weights, the fractal and texture generators and the pretraining script, offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from restune import backbones
from restune.pretraining import WEIGHTS, make_categories, render_batch
from restune.pretraining.images import batch_rng
from restune.pretraining.model import ARCH, PRETRAIN_CLASSES, build
from restune.pretraining.textures import make_textures, render_composites, render_textures
from restune.pretraining.train import PretrainConfig, pretrain


@pytest.fixture(scope="module")
def shipped() -> dict[str, torch.Tensor]:
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} is missing: run python -m restune.pretraining.train (see restune_vit_tiny.md)")
    return load_file(str(WEIGHTS))


def test_shipped_file_is_small_and_has_the_pretraining_head(shipped: dict[str, torch.Tensor]) -> None:
    assert WEIGHTS.stat().st_size <= 10 * 1024 * 1024
    assert shipped["head.weight"].shape == (PRETRAIN_CLASSES, ARCH["embed_dim"])
    assert WEIGHTS.with_suffix(".md").is_file()


@pytest.mark.parametrize("via", ["backbones", "timm"])
def test_pretrained_loads_backbone_as_float32_with_fresh_head(shipped: dict[str, torch.Tensor], via: str) -> None:
    if via == "backbones":
        model = backbones.create("restune_vit_tiny", pretrained=True, num_classes=5)
    else:
        model = timm.create_model("restune_vit_tiny", pretrained=True, num_classes=5)
    state = model.state_dict()
    for name, value in shipped.items():
        if not name.startswith("head."):
            assert state[name].dtype == torch.float32, name
            assert torch.equal(state[name], value.float()), name
    assert model.head.weight.shape == (5, ARCH["embed_dim"])
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_random_init_differs_from_shipped(shipped: dict[str, torch.Tensor]) -> None:
    model = backbones.create("restune_vit_tiny", pretrained=False, num_classes=5)
    weight = model.blocks[0].attn.qkv.weight
    assert weight.shape == shipped["blocks.0.attn.qkv.weight"].shape
    assert not torch.equal(weight, shipped["blocks.0.attn.qkv.weight"].float())


def test_generator_is_deterministic_and_labels_in_range() -> None:
    categories = make_categories(6, seed=3)
    assert categories.num_classes == 6
    assert np.array_equal(categories.maps, make_categories(6, seed=3).maps)
    images, labels = render_batch(categories, batch_rng(3, 7), 16)
    again, labels_again = render_batch(make_categories(6, seed=3), batch_rng(3, 7), 16)
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert labels.min() >= 0 and labels.max() < 6
    other, _ = render_batch(categories, batch_rng(3, 7, heldout=True), 16)
    assert not np.array_equal(images, other)
    small, _ = render_batch(categories, batch_rng(3, 7), 4, size=16)
    assert small.shape == (4, 16, 16, 3)


def test_tiny_pretraining_run_writes_loadable_weights_and_resumes(tmp_path: Path) -> None:
    output = tmp_path / "tiny.safetensors"
    config = PretrainConfig(
        output=str(output),
        steps=3,
        batch_size=8,
        num_classes=4,
        texture_classes=3,
        embed_dim=32,
        depth=1,
        num_heads=2,
        eval_batches=1,
        checkpoint=str(tmp_path / "ckpt.pt"),
        checkpoint_every=2,
    )
    summary = pretrain(config)
    assert 0.0 <= summary["heldout_fractal_acc"] <= 1.0 and 0.0 <= summary["heldout_texture_acc"] <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "tiny.safetensors"]  # no temp files left
    state = load_file(str(output))
    assert all(v.dtype == torch.float16 for v in state.values())
    model = build(num_classes=4 + 3, embed_dim=32, depth=1, num_heads=2)  # fractal logits, then texture logits
    model.load_state_dict(state)
    config.steps = 4  # resumes from the step-3 checkpoint and trains one more step
    assert pretrain(config)["config"]["steps"] == 4


def test_textures_are_deterministic_in_range_and_distinct_per_category() -> None:
    textures = make_textures(5, seed=2)
    assert textures.num_classes == 5
    labels = np.array([0, 1, 2, 3, 4, 0])
    pattern, colours = render_textures(textures, labels, np.random.default_rng(4))
    again, _ = render_textures(make_textures(5, seed=2), labels, np.random.default_rng(4))
    assert pattern.shape == (6, 32, 32) and colours.shape == (6, 2, 3)
    assert np.array_equal(pattern, again)
    assert pattern.min() >= 0.0 and pattern.max() <= 1.0
    assert (pattern.std((1, 2)) > 0.05).all()  # every instance has structure, none is flat
    assert not np.array_equal(make_textures(5, seed=3).freqs, textures.freqs)


def test_composites_carry_both_labels_and_follow_the_rng() -> None:
    fractals, textures = make_categories(4, seed=1), make_textures(3, seed=1)
    images, fractal, texture = render_composites(fractals, textures, batch_rng(1, 0), 8)
    again = render_composites(fractals, textures, batch_rng(1, 0), 8)
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again[0]) and np.array_equal(fractal, again[1]) and np.array_equal(texture, again[2])
    assert fractal.max() < 4 and texture.max() < 3 and fractal.min() >= 0 and texture.min() >= 0
