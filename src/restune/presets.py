"""Presets that belong to no single tuner file, and the public listing of presets.

Each tuner file registers its own presets next to its defaults (``register_preset`` in ``restune.contract``); what
is left here is what trains no tuner (the linear probe, BitFit, full fine-tuning) and the Res-Tuning combination of
two tuners. Counts in the comments are the trainable parameters without the head on ViT-B/16.
"""

from __future__ import annotations

from restune import contract
from restune.contract import get_preset, register_preset
from restune.spec import TUNERS, TuneSpec
from restune.tuners.adapter import ResAdapterConfig
from restune.tuners.prefix import ResPrefixConfig

__all__ = ["presets", "get_preset", "register_preset"]


def presets(kind: str | None = TUNERS, *, family: str | None = None) -> list[str]:
    """Preset names in registration order: by default those ``restune.tune`` takes.

    Args:
        kind: ``tuners`` (default), ``bypass`` (the presets ``restune.Bypass`` takes) or None for every preset.
        family: list what resolves on this backbone family (None: the default family).
    """
    return contract.presets(kind=kind, family=family)


# A reconstruction: which combination gave the published 0.55M is not confirmed by the paper
# (docs/methods/res-tuning.md).
register_preset("res_tuning", lambda: TuneSpec([ResPrefixConfig(), ResAdapterConfig()]))  # 378,000
register_preset("bitfit", lambda: TuneSpec([], train=r".*\.bias"))  # 102,912: every bias of the backbone
register_preset("linear", lambda: TuneSpec([]))  # 0: the head alone
register_preset("full", lambda: TuneSpec([], train=r".*"))  # 85,798,656: everything
