"""timm backbones, created offline: random initialisation, or pretrained weights from a local file.

Nothing is ever downloaded. Weights come from a ``.safetensors`` or ``.pth`` file through timm's
``pretrained_cfg_overlay=dict(file=...)`` (``.pth`` read with ``weights_only=True``: no pickle code runs), or from a
Google ``.npz`` through timm's own npz loader (``model.load_pretrained``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
from torch import nn

__all__ = ["create"]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def create(name: str, *, pretrained_file: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """Create a timm model by name, optionally with pretrained weights from a local file.

    Args:
        name: a timm model name, e.g. ``vit_base_patch16_224.orig_in21k``.
        pretrained_file: local weights; None gives a randomly initialised model.
        **kwargs: passed to ``timm.create_model`` (``num_classes``, ``drop_path_rate``, ...).

    Returns:
        The model. As in timm, the file's head is used only when ``num_classes`` equals the pretrained config's;
        otherwise the head is newly initialised (the usual case when adapting to a new task).
    """
    kwargs.pop("pretrained", None)
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
