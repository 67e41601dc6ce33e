"""Each paper's method as a named configuration (specs/README.md §7).

A preset is a function returning a fresh ``TuneSpec``, so callers can change what they get without touching the
registry. Counts in the comments are the trainable parameters without the head on ViT-B/16.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from restune.spec import TuneSpec
from restune.tuners import (
    LoraConfig,
    ResAdapterConfig,
    ResAttnConfig,
    ResLoraConfig,
    ResPrefixConfig,
    ResPromptConfig,
    SSFConfig,
    adaptformer,
    arc,
    hta,
    prefix_tuning,
    rlrr,
    sequential_adapter,
    snell,
    vpt,
)

__all__ = ["presets", "get_preset", "register_preset"]

_PRESETS: dict[str, Callable[[], TuneSpec]] = {}


def register_preset(name: str, build: Callable[[], TuneSpec]) -> None:
    """Add a named preset; names are unique."""
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    _PRESETS[name] = build


def presets() -> list[str]:
    """The names of every preset, in registration order."""
    return list(_PRESETS)


def get_preset(name: str) -> TuneSpec:
    """A fresh spec for a preset; an unknown name raises with the list and the closest names."""
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, list(_PRESETS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}.{hint} Presets: {', '.join(_PRESETS)}; or give a YAML spec path")
    spec = _PRESETS[name]()
    spec.preset = name
    return spec


register_preset("lora", lambda: TuneSpec([LoraConfig()]))  # 294,912
register_preset("res_adapter", lambda: TuneSpec([ResAdapterConfig()]))  # 193,668
register_preset("res_prefix", lambda: TuneSpec([ResPrefixConfig()]))  # 184,332
register_preset("res_prompt", lambda: TuneSpec([ResPromptConfig()]))  # 92,172
register_preset("res_lora", lambda: TuneSpec([ResLoraConfig()]))  # 294,936
register_preset("res_attn", lambda: TuneSpec([ResAttnConfig()]))  # 589,836
# A reconstruction: which combination gave the published 0.55M is not confirmed by the paper (res-tuning.md §6).
register_preset("res_tuning", lambda: TuneSpec([ResPrefixConfig(), ResAdapterConfig()]))  # 378,000
register_preset("ssf", lambda: TuneSpec([SSFConfig()]))  # 205,824
register_preset("bitfit", lambda: TuneSpec([], train=r".*\.bias"))  # 102,912: every bias of the backbone
register_preset("linear", lambda: TuneSpec([]))  # 0: the head alone
register_preset("full", lambda: TuneSpec([], train=r".*"))  # 85,798,656: everything

# The other methods keep their presets next to their defaults, in their own files (the specs of each method, and
# baselines.md for VPT, the sequential adapter, AdaptFormer and prefix tuning).
for _module in (rlrr, arc, hta, snell, vpt, sequential_adapter, adaptformer, prefix_tuning):
    for _name, _build in _module.PRESETS.items():
        register_preset(_name, _build)
