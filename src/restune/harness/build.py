"""What a run trains: the backbone with its spec built on it (tuners or a Bypass), its data and optimizer groups.

Kept apart from the loop so ``restune eval`` rebuilds exactly the model a run trained.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torchvision import transforms

import restune
from restune import backbones
from restune.bypass import BYPASS
from restune.data import VTAB_GROUPS, build_transform, open_dataset
from restune.harness.config import TrainConfig
from restune.harness.recipes import Recipe
from restune.spec import resolve

__all__ = ["is_bypass", "build_backbone", "build_model", "transforms_for", "open_split", "param_groups", "count"]


def is_bypass(tuner: str) -> bool:
    """Whether a ``--tuner`` value (a preset of either kind or a YAML spec) resolves to a Res-Tuning-Bypass."""
    return resolve(tuner).kind == BYPASS


def build_backbone(config: TrainConfig, num_classes: int, recipe: Recipe) -> nn.Module:
    """The run's backbone, pretrained from a local file or shipped with restune (random only when asked)."""
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": recipe.drop_path}
    if config.img_size:
        kwargs["img_size"] = config.img_size
    if config.random_init and config.pretrained_file is not None:
        raise ValueError("random_init and pretrained_file contradict each other; drop one")
    if config.pretrained_file is None and backbones.shipped_weights(config.model) is None and not config.random_init:
        warnings.warn(
            f"{config.model}: no --pretrained-file, so the backbone is randomly initialised (restune never downloads "
            "weights); pass a local .safetensors, .pth or .npz file",
            stacklevel=2,
        )
    pretrained = not config.random_init
    return backbones.create(config.model, pretrained_file=config.pretrained_file, pretrained=pretrained, **kwargs)


def build_model(config: TrainConfig, num_classes: int, recipe: Recipe) -> nn.Module:
    """The backbone with the run's spec built on it: tuners attached, or a Bypass beside it (one table decides)."""
    model = restune.build(build_backbone(config, num_classes, recipe), config.tuner, num_classes=num_classes)
    if recipe.zero_head:  # RLRR, ARC and HTA code start from a zero head
        with torch.no_grad():
            for param in model.get_classifier().parameters():
                param.zero_()
    return model


def transforms_for(model: nn.Module, recipe: Recipe) -> tuple[Any, Any]:
    """(train, eval) transforms: direct bicubic resize and the recipe's normalisation; flips only where it says."""
    evaluation = build_transform(model, normalization=recipe.normalization)
    training = transforms.Compose([transforms.RandomHorizontalFlip(), evaluation]) if recipe.hflip else evaluation
    return training, evaluation


def open_split(config: TrainConfig, split: str, transform: Any = None, num_classes: int | None = None) -> Any:
    """One split of the run's task; labels are checked against the run's class count (see ``TrainConfig``)."""
    if not config.data_dir or not config.dataset:
        raise ValueError("--data-dir and --dataset are required: the folder holding the task folders, and the task")
    known = VTAB_GROUPS[config.dataset].num_classes if config.dataset in VTAB_GROUPS else None
    classes = num_classes or config.num_classes or known
    return open_dataset(config.data_dir, config.dataset, split, transform, num_classes=classes)


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """AdamW groups: the trainable tensors, with the recipe's weight-decay exemptions in a group of their own."""
    decay, exempt = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (exempt if any(part in name for part in recipe.no_decay) else decay).append(param)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}]
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0})
    return groups


def count(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters with the head, the head's trainable parameters)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for p in model.get_classifier().parameters() if p.requires_grad)
    return trainable, head
