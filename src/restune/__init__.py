"""restune: Res-Tuning and related parameter-efficient tuners for vision backbones.

Public functions only; everything else is reachable through its module (``restune.sites``, ``restune.tuners``...).
"""

from restune import backbones, features, parity, tuners
from restune.building import build
from restune.bypass import Bypass, BypassConfig, MultiTask
from restune.checkpoint import load, save
from restune.merge import merge, unmerge
from restune.presets import presets
from restune.report import Report, report
from restune.spec import TuneSpec, resolve
from restune.tune import disabled, set_active, tune
from restune.version import __version__

__all__ = [
    "tune",
    "build",
    "resolve",
    "Bypass",
    "BypassConfig",
    "MultiTask",
    "presets",
    "report",
    "Report",
    "TuneSpec",
    "set_active",
    "disabled",
    "save",
    "load",
    "merge",
    "unmerge",
    "parity",
    "features",
    "backbones",
    "tuners",
    "__version__",
]
