"""Tuner implementations: every module in this folder is imported here, which registers its tuners and presets.

A new tuner is one file dropped into this folder; nothing lists the files. The contract's names (``Tuner``,
``TunerConfig``, ``Binding``, ``register_tuner``, ``register_preset``...) are re-exported, and so is each tuner
module's ``__all__`` (``from restune.tuners import LoraConfig`` keeps working).
"""

import importlib
import pkgutil

from restune.contract import (
    Binding,
    Tuner,
    TunerConfig,
    TunerType,
    config_from_dict,
    get_preset,
    get_tuner,
    presets,
    register_preset,
    register_tuner,
    tuner_names,
    unregister_preset,
    unregister_tuner,
)
from restune.layers.scale import Scale

__all__ = [
    "Binding",
    "Tuner",
    "TunerConfig",
    "TunerType",
    "register_tuner",
    "unregister_tuner",
    "register_preset",
    "unregister_preset",
    "get_tuner",
    "get_preset",
    "presets",
    "tuner_names",
    "config_from_dict",
    "Scale",
]


def _discover() -> None:
    """Import every module of this package (sorted, so registration order is stable) and re-export its names."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name in getattr(module, "__all__", ()):
            if name not in globals():
                globals()[name] = getattr(module, name)
                __all__.append(name)


_discover()
