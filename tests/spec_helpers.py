"""Helpers shared by the spec tests (test_spec.py, test_spec_yaml.py)."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from restune.tune import get_store

# Two tuners with non-default sites, layers and sizes, and a frozen head: a spec a user would write by hand.
TWO_TUNERS_YAML = """\
tuners:
  - type: res_prefix
    sites: 'blocks\\.\\d+\\.attn'
    length: 5
    layers: [0, 1, 2]
  - type: res_adapter
    sites: 'blocks\\.\\d+\\.mlp'
    layers: [6, 7, 8, 9, 10, 11]
    dim: 32
    scale: scale_channel
head: freeze
"""


def meta_vit(num_classes: int = 100) -> nn.Module:
    """A timm ViT-B/16 built on the meta device."""
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=num_classes)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tuner_keys(model: nn.Module, set_name: str = "default") -> list[str]:
    store = get_store(model)
    assert store is not None
    return [key for key, _ in store.sets[set_name].named_tuners()]
