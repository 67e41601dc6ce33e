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


def _google_npz(model: torch.nn.Module, path: Path) -> None:
    """Write a timm ViT in the original Google ViT .npz layout (the inverse of timm's npz loader)."""
    import numpy as np

    def dense(linear: torch.nn.Linear, key: str, out: dict) -> None:
        out[f"{key}/kernel"] = linear.weight.detach().numpy().T
        out[f"{key}/bias"] = linear.bias.detach().numpy()

    def norm(layer: torch.nn.LayerNorm, key: str, out: dict) -> None:
        out[f"{key}/scale"] = layer.weight.detach().numpy()
        out[f"{key}/bias"] = layer.bias.detach().numpy()

    w: dict = {
        "embedding/kernel": model.patch_embed.proj.weight.detach().permute(2, 3, 1, 0).numpy(),
        "embedding/bias": model.patch_embed.proj.bias.detach().numpy(),
        "cls": model.cls_token.detach().numpy(),
        "Transformer/posembed_input/pos_embedding": model.pos_embed.detach().numpy(),
    }
    norm(model.norm, "Transformer/encoder_norm", w)
    dense(model.head, "head", w)
    for i, block in enumerate(model.blocks):
        prefix = f"Transformer/encoderblock_{i}/"
        heads, dim = block.attn.num_heads, block.attn.qkv.in_features
        qkv_w, qkv_b = block.attn.qkv.weight.detach(), block.attn.qkv.bias.detach()
        for index, name in enumerate(("query", "key", "value")):
            rows = slice(index * dim, (index + 1) * dim)
            w[f"{prefix}MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[rows].T.reshape(dim, heads, -1).numpy()
            w[f"{prefix}MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[rows].reshape(heads, -1).numpy()
        proj = block.attn.proj.weight.detach()
        w[f"{prefix}MultiHeadDotProductAttention_1/out/kernel"] = proj.reshape(dim, heads, -1).permute(1, 2, 0).numpy()
        w[f"{prefix}MultiHeadDotProductAttention_1/out/bias"] = block.attn.proj.bias.detach().numpy()
        norm(block.norm1, f"{prefix}LayerNorm_0", w)
        norm(block.norm2, f"{prefix}LayerNorm_2", w)
        dense(block.mlp.fc1, f"{prefix}MlpBlock_3/Dense_0", w)
        dense(block.mlp.fc2, f"{prefix}MlpBlock_3/Dense_1", w)
    np.savez(path, **w)


def test_google_npz_loads_through_timm(tmp_path: Path) -> None:
    source = _reference(num_classes=7)
    path = tmp_path / "ViT-tiny.npz"
    _google_npz(source, path)
    loaded = backbones.create(TINY, pretrained_file=path, num_classes=7, img_size=32)
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name  # the head too: its shape matches the file's
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), source.eval()(images))
