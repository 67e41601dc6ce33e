"""The evaluation-style input pipeline every VTAB-1k recipe trains with: direct resize, to tensor, normalise.

The papers (docs/methods/README.md) resize straight to the model's input size with bicubic interpolation and use no
augmentation and no centre crop, so ``crop_pct`` in timm's config is deliberately ignored. What differs between
code bases is the normalisation: timm's config for the in21k ViTs (0.5/0.5, RLRR), the ImageNet statistics (NOAH,
FacT, ARC, SNELL, V-PETL) or none (PETL_Vision). The result is deterministic, so feature caches accept it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import timm
from torch import nn
from torchvision import transforms

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZATIONS", "build_transform", "input_size"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("model", "imagenet", "none")

Normalization = Literal["model", "imagenet", "none"]
ModelOrCfg = nn.Module | Mapping[str, Any] | str


def _unwrap(model: nn.Module) -> nn.Module:
    """The timm model inside common wrappers (a restune Bypass's ``backbone``, DataParallel's ``module``)."""
    for _ in range(4):
        if getattr(model, "pretrained_cfg", None) is not None or hasattr(model, "patch_embed"):
            break
        inner = getattr(model, "backbone", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _data_config(model_or_cfg: ModelOrCfg) -> dict[str, Any]:
    if isinstance(model_or_cfg, nn.Module):
        return timm.data.resolve_data_config({}, model=_unwrap(model_or_cfg))
    if isinstance(model_or_cfg, str):
        cfg = timm.models.get_pretrained_cfg(model_or_cfg)
        if cfg is None:
            raise ValueError(
                f"timm has no pretrained config named {model_or_cfg!r}; pass the model itself, a config mapping with "
                "'input_size', 'mean' and 'std', or a timm name such as 'vit_base_patch16_224.orig_in21k'"
            )
        return timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    if isinstance(model_or_cfg, Mapping):
        return timm.data.resolve_data_config({}, pretrained_cfg=dict(model_or_cfg))
    raise TypeError(f"expected a model, a config mapping or a timm model name, got {type(model_or_cfg).__name__}")


def input_size(model_or_cfg: ModelOrCfg) -> tuple[int, int]:
    """The (height, width) the model takes.

    A timm ViT's patch embedding knows its real size, which wins over ``pretrained_cfg["input_size"]``: timm keeps
    the pretraining size in the config when a model is built with another ``img_size`` (e.g. 32 px test models).
    """
    if isinstance(model_or_cfg, nn.Module):
        size = getattr(getattr(_unwrap(model_or_cfg), "patch_embed", None), "img_size", None)
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            return int(size[0]), int(size[1])
    _, height, width = _data_config(model_or_cfg)["input_size"]
    return int(height), int(width)


def build_transform(
    model_or_cfg: ModelOrCfg,
    *,
    normalization: Normalization = "model",
    img_size: int | tuple[int, int] | None = None,
) -> transforms.Compose:
    """Resize (bicubic, to the exact input size, no crop), convert to a tensor in [0, 1], normalise.

    Args:
        model_or_cfg: a timm model (or a wrapper with ``backbone``/``module``), a ``pretrained_cfg``-style mapping, or
            a timm pretrained name such as ``"vit_base_patch16_224.orig_in21k"``; gives the size and ``"model"`` stats.
        normalization: ``"model"``: the model's ``pretrained_cfg`` mean/std (0.5/0.5 for the in21k ViTs; timm's
            ImageNet defaults for a model without a config); ``"imagenet"``: (0.485, 0.456, 0.406)/(0.229, 0.224,
            0.225) as NOAH/FacT/ARC/SNELL use; ``"none"``: leave values in [0, 1] as PETL_Vision does.
        img_size: overrides the size: an int for a square or ``(height, width)``.

    Returns:
        A torchvision ``Compose`` taking a PIL image and returning a float tensor ``(3, height, width)``.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    if img_size is None:
        size = input_size(model_or_cfg)
    elif isinstance(img_size, int):
        size = (img_size, img_size)
    else:
        size = (int(img_size[0]), int(img_size[1]))
    if min(size) < 1:
        raise ValueError(f"image size must be positive, got {size}")
    steps: list[Any] = [
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
    ]
    if normalization == "model":
        cfg = _data_config(model_or_cfg)
        steps.append(transforms.Normalize(tuple(cfg["mean"]), tuple(cfg["std"])))
    elif normalization == "imagenet":
        steps.append(transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return transforms.Compose(steps)
