"""timm backbones, created offline: random initialisation, or pretrained weights from a local file.

Nothing is ever downloaded. Weights come from a ``.safetensors`` or ``.pth`` file through timm's
``pretrained_cfg_overlay=dict(file=...)`` (``.pth`` read with ``weights_only=True``: no pickle code runs), or from a
Google ``.npz`` through timm's own npz loader (``model.load_pretrained``), or, for ``restune_vit_tiny``, from the
weights shipped inside the package (``pretrained=True``; see ``restune/weights/restune_vit_tiny.md``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from restune.pretraining.model import MODEL_NAME, WEIGHTS  # importing it registers restune_vit_tiny with timm

__all__ = ["create", "feature_keys", "block_features", "shipped_weights"]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def shipped_weights(name: str) -> Path | None:
    """The weight file shipped inside restune for ``name`` (any ``.tag``), or None when restune ships none for it."""
    return WEIGHTS if name.split(".")[0] == MODEL_NAME else None


def create(name: str, *, pretrained_file: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """Create a timm model by name, optionally with pretrained weights from a local file.

    Args:
        name: a timm model name, e.g. ``vit_base_patch16_224.orig_in21k``, or ``restune_vit_tiny``.
        pretrained_file: local weights; None gives a randomly initialised model, except as below.
        **kwargs: passed to ``timm.create_model`` (``num_classes``, ``drop_path_rate``, ...). ``pretrained=True``
            matters only for a model whose weights ship with restune (``restune_vit_tiny``): with no
            ``pretrained_file`` it loads the shipped file. For any other model ``pretrained`` is ignored, as before,
            because restune never downloads: pass ``pretrained_file``.

    Returns:
        The model. As in timm, the file's head is used only when ``num_classes`` equals the pretrained config's;
        otherwise the head is newly initialised (the usual case when adapting to a new task).
    """
    pretrained = bool(kwargs.pop("pretrained", False))
    if pretrained_file is None and pretrained:
        pretrained_file = shipped_weights(name)
    if pretrained_file is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    path = Path(pretrained_file)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained file {path} does not exist")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"pretrained file {path} has suffix {path.suffix!r}; use one of {', '.join(WEIGHT_SUFFIXES)}")
    if path.suffix == ".npz":
        model = timm.create_model(name, pretrained=False, **kwargs)
        if not hasattr(model, "load_pretrained"):
            raise ValueError(f"{name} cannot read Google .npz weights (timm gives it no load_pretrained)")
        model.load_pretrained(str(path))
        return model
    overlay = dict(file=str(path))
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def feature_keys(model: nn.Module, blocks: Sequence[int] | None = None) -> list[int]:
    """Feature indices in the spec's numbering: 0 is the input of ``blocks.0``, l is the output of ``blocks.(l-1)``."""
    depth = len(model.blocks)
    chosen = range(depth) if blocks is None else blocks
    bad = [i for i in chosen if not 0 <= i < depth]
    if bad:
        raise ValueError(f"blocks {bad} do not exist; this backbone has blocks 0..{depth - 1}")
    return [0] + sorted({i + 1 for i in chosen})


def block_features(
    model: nn.Module,
    images: torch.Tensor,
    keys: Sequence[int],
    *,
    class_token_only: bool = False,
    chunk_size: int | None = None,
) -> dict[int, torch.Tensor]:
    """Run a frozen timm ViT once, without autograd, and keep the features the bypass reads.

    Returns ``{0: x_0, l: x_l}`` for the requested keys (``feature_keys``). x_0 is the input of ``blocks.0``
    (after the patch embedding, class token, position embedding, ``patch_drop`` and ``norm_pre``), x_l the output of
    ``blocks.(l-1)``, all tokens, as timm's ``forward_intermediates`` does not give them (it drops prefix tokens and
    has no x_0). With ``class_token_only`` each feature keeps only token 0 (a copy, so the full activations are freed
    block by block). ``chunk_size`` streams the batch through the backbone in pieces: with no graph to keep, peak
    memory is then one chunk's activations.
    """
    wanted = set(keys)
    last = max(wanted)
    size = chunk_size or len(images)
    out: dict[int, torch.Tensor] = {}

    def keep(key: int, x: torch.Tensor, start: int) -> None:
        if key not in wanted:
            return
        x = x[:, :1] if class_token_only else x
        if size >= len(images):  # one chunk: keep the tensor itself (a copy for the class token, to free the rest)
            out[key] = x.clone() if class_token_only else x
            return
        if key not in out:  # written in place chunk by chunk: no second copy of the features at the end
            out[key] = x.new_empty((len(images), *x.shape[1:]))
        out[key][start : start + len(x)] = x

    with torch.no_grad():
        for start in range(0, len(images), size):
            x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images[start : start + size]))))
            keep(0, x, start)
            for index, block in enumerate(model.blocks[:last]):
                x = block(x)
                keep(index + 1, x, start)
    return {k: out[k] for k in sorted(wanted)}
