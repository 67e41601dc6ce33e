"""Offline pretrained loading through timm, on weight files the tests make themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from restune import backbones

TINY = "vit_tiny_patch16_224"


def _reference(num_classes: int = 7) -> torch.nn.Module:
    torch.manual_seed(3)
    return backbones.create(TINY, num_classes=num_classes, img_size=32)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_file_loads_every_backbone_tensor(tmp_path: Path, suffix: str) -> None:
    """As in timm, a num_classes other than the pretrained config's gets a fresh head; the backbone loads whole."""
    source = _reference()
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = backbones.create(TINY, pretrained_file=path, num_classes=7, img_size=32)
    for name, value in source.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(loaded.state_dict()[name], value), name
    assert not torch.equal(loaded.head.weight, source.head.weight)


def test_new_head_size_keeps_backbone_and_reinitialises_head(tmp_path: Path) -> None:
    source = _reference(num_classes=7)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = backbones.create(TINY, pretrained_file=path, num_classes=3, img_size=32)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert loaded.head.weight.shape == (3, loaded.embed_dim)


def test_missing_and_unsupported_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        backbones.create(TINY, pretrained_file=tmp_path / "nope.safetensors")
    odd = tmp_path / "weights.bin2"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match="suffix"):
        backbones.create(TINY, pretrained_file=odd)
