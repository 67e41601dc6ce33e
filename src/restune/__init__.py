"""restune: Res-Tuning and related parameter-efficient tuners for timm vision transformers.

Public functions only; everything else is reachable through its module (``restune.sites``, ``restune.tuners``...).
"""

from restune import backbones, features, parity, tuners
from restune.bypass import Bypass, BypassConfig, MultiTask
from restune.checkpoint import load, save
from restune.merge import merge, unmerge
from restune.presets import presets
from restune.report import Report, report
from restune.spec import TuneSpec
from restune.tune import disabled, set_active, tune

__version__ = "0.1.0"

__all__ = [
    "tune",
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
