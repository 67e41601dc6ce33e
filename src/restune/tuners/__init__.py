"""Tuner implementations; importing this package registers every tuner type."""

from restune.tuners import (  # noqa: F401
    adapter,
    adaptformer,
    arc,
    attention,
    hta,
    lora,
    prefix,
    prefix_tuning,
    prompt,
    rlrr,
    sequential_adapter,
    snell,
    ssf,
    vpt,
)
from restune.tuners.adapter import ResAdapter, ResAdapterConfig, SwiftResAdapter
from restune.tuners.attention import ResAttn, ResAttnConfig
from restune.tuners.base import Binding, Tuner, TunerConfig, config_from_dict, get_tuner, register_tuner, tuner_names
from restune.tuners.lora import LoraConfig, LowRankDelta, ResLoraConfig
from restune.tuners.prefix import ResPrefix, ResPrefixConfig
from restune.tuners.prompt import ResPrompt, ResPromptConfig
from restune.tuners.scale import Scale
from restune.tuners.ssf import SSF, SSFConfig

__all__ = [
    "Binding",
    "Tuner",
    "TunerConfig",
    "register_tuner",
    "get_tuner",
    "tuner_names",
    "config_from_dict",
    "Scale",
    "ResAdapter",
    "ResAdapterConfig",
    "SwiftResAdapter",
    "ResAttn",
    "ResAttnConfig",
    "LoraConfig",
    "ResLoraConfig",
    "LowRankDelta",
    "ResPrefix",
    "ResPrefixConfig",
    "ResPrompt",
    "ResPromptConfig",
    "SSF",
    "SSFConfig",
]
