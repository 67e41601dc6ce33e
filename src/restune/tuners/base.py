"""The tuner contract, kept importable under its old name; it lives in ``restune.contract``."""

from restune.contract import (
    CONFIG_FORMAT_VERSION,
    Binding,
    Tuner,
    TunerConfig,
    TunerType,
    config_from_dict,
    default_sites,
    get_tuner,
    positive_int,
    register_tuner,
    tuner_names,
)

__all__ = [
    "Binding",
    "TunerConfig",
    "Tuner",
    "TunerType",
    "register_tuner",
    "get_tuner",
    "tuner_names",
    "config_from_dict",
    "positive_int",
    "default_sites",
    "CONFIG_FORMAT_VERSION",
]
