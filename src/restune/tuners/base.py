"""The tuner contract and the registry.

Every method is three things in one file: a validated ``@dataclass`` config whose defaults reproduce the paper, a
module class that says how it binds to a site, and one ``register_tuner`` call. Keeping the contract this small
(peft's config/layer split, without the model wrapper) is what lets any tuner go on any compatible site.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import nn

from restune.sites import Site

__all__ = [
    "Binding",
    "TunerConfig",
    "Tuner",
    "register_tuner",
    "get_tuner",
    "tuner_names",
    "config_from_dict",
    "CONFIG_FORMAT_VERSION",
]

CONFIG_FORMAT_VERSION = 1


class Binding(str, Enum):
    """How a tuner attaches to its site (DESIGN.md, "The tuner contract")."""

    PARALLEL = "parallel"  # OP(x) + s * R(x)
    ATTENTION_BRANCH = "attention_branch"  # an extra attention term inside MHA
    WEIGHT_DELTA = "weight_delta"  # the linear computes with W + dW(theta); mergeable
    AFFINE = "affine"  # a per-channel or linear map of the op's input ("before") or output ("after")
    SEQUENTIAL = "sequential"  # R(OP(x)): a module applied to the op's output, inside the branch (NOAH's adapter)
    TOKENS = "tokens"  # learnable tokens put into the sequence before a block and taken out after the final norm


@dataclass
class TunerConfig:
    """Fields every tuner config shares.

    Attributes:
        sites: which sites to bind to. A string is a regex matched against the whole dotted site name; a list matches
            exact names or dotted suffixes (peft's ``target_modules`` rules).
        layers: keep only sites inside these block indices (None: all blocks).
    """

    type: ClassVar[str] = ""
    sites: str | list[str] = ""
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        name = self.type or type(self).__name__
        if isinstance(self.sites, tuple):
            self.sites = list(self.sites)
        if isinstance(self.sites, str):
            if not self.sites:
                raise ValueError(f"{name}: 'sites' is empty; give a regex such as 'blocks\\.\\d+\\.mlp' or a list")
        elif not (isinstance(self.sites, list) and self.sites and all(isinstance(s, str) for s in self.sites)):
            raise ValueError(f"{name}: 'sites' must be a regex string or a non-empty list of names, got {self.sites!r}")
        if self.layers is not None:
            self.layers = list(self.layers)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
                raise ValueError(f"{name}: 'layers' must be non-negative block indices, got {self.layers!r}")
        self.validate()

    def validate(self) -> None:
        """Check the method's own fields; raise ValueError naming the field and the allowed values."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of this config: its own fields, plus ``type`` and ``format_version``."""
        values = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"type": self.type, "format_version": CONFIG_FORMAT_VERSION, **values}

    def replace(self, **changes: Any) -> TunerConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def positive_int(config: TunerConfig, name: str) -> None:
    """Raise unless ``config.<name>`` is a positive int; shared by the configs' ``validate``."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{config.type}: '{name}' must be a positive integer, got {value!r}")


class Tuner(nn.Module):
    """Base class of tuner modules.

    A subclass sets ``binding`` and the site kinds it accepts, builds its parameters from ``(config, site)`` on the
    site's device and dtype, and implements the method its binding calls:

    - parallel and weight-delta tuners: ``forward(x)`` returns what is added to the site's output;
    - attention-branch tuners: ``branch(q, attention)`` returns the extra attention term before ``W_o``; those that
      set ``joins_softmax`` instead give ``keys_values(attention)`` that join the backbone's own keys and values;
    - sequential tuners: ``forward(output)`` returns the site's new output;
    - token tuners: ``forward(batch)`` returns the (batch, length, D) tokens to put in the sequence.

    ``check_model`` lets a tuner refuse a model it cannot work on before anything is attached.
    """

    binding: ClassVar[Binding]
    site_kinds: ClassVar[frozenset[str]]
    position: str = "after"  # affine tuners only: transform the site's input ("before") or output ("after")
    mixes_tokens: ClassVar[bool] = False  # True when one token's output depends on other tokens (attention)
    joins_softmax: ClassVar[bool] = False  # attention-branch tuners whose keys join the backbone's softmax

    def __init__(self, config: TunerConfig, site: Site) -> None:
        super().__init__()
        self.config = config
        self.site_name = site.name

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        """Raise a ValueError naming the problem if this tuner cannot work on ``model`` (default: any model)."""

    @classmethod
    def build_all(cls, config: TunerConfig, sites: list[Site]) -> list[Tuner]:
        """One tuner per matched site.

        Override to share tensors between sites (ARC's shared projections): a shared ``nn.Parameter`` registered in
        several tuners is counted, trained and saved once.
        """
        return [cls(config, site) for site in sites]

    def delta_bias(self) -> torch.Tensor | None:
        """The bias delta of a mergeable tuner that also shifts the bias (RLRR's f), else None."""
        return None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The tensors this tuner trains (fixed constants are buffers and never appear here)."""
        return list(self.parameters())

    def delta_weight(self) -> torch.Tensor:
        """The weight delta in PyTorch (out, in) layout, for tuners that fold into the frozen weight."""
        raise TypeError(f"{type(self).__name__} on {self.site_name} is not mergeable")

    def extra_repr(self) -> str:
        return f"site={self.site_name}"


@dataclass(frozen=True)
class TunerType:
    """One registry entry."""

    name: str
    config_cls: type[TunerConfig]
    module_cls: type[Tuner]


_REGISTRY: dict[str, TunerType] = {}


def register_tuner(name: str, config_cls: type[TunerConfig], module_cls: type[Tuner]) -> None:
    """Make a tuner available by name to specs, presets, YAML files and checkpoints."""
    if not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"tuner names are lower-case identifiers, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"tuner {name!r} is already registered (by {_REGISTRY[name].module_cls.__name__})")
    config_cls.type = name
    _REGISTRY[name] = TunerType(name, config_cls, module_cls)


def tuner_names() -> list[str]:
    """Every registered tuner type, sorted."""
    return sorted(_REGISTRY)


def get_tuner(name: str) -> TunerType:
    """The registry entry for ``name``; an unknown name raises with the closest known names."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown tuner type {name!r}.{hint} Known tuner types: {', '.join(tuner_names())}")
    return _REGISTRY[name]


def config_from_dict(data: dict[str, Any]) -> TunerConfig:
    """Rebuild a tuner config from ``TunerConfig.to_dict`` output (or a hand-written YAML entry)."""
    data = dict(data)
    if "type" not in data:
        raise ValueError(f"a tuner entry needs a 'type' (one of {', '.join(tuner_names())}); got keys {sorted(data)}")
    entry = get_tuner(data.pop("type"))
    version = data.pop("format_version", CONFIG_FORMAT_VERSION)
    if version > CONFIG_FORMAT_VERSION:
        raise ValueError(f"{entry.name}: config format {version} is newer than this restune ({CONFIG_FORMAT_VERSION})")
    known = {f.name for f in dataclasses.fields(entry.config_cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{entry.name}: unknown option(s) {unknown}; allowed: {sorted(known)}")
    return entry.config_cls(**data)


def default_sites(pattern: str | list[str]) -> Any:
    """A dataclass default for ``sites``: strings directly, lists through a factory."""
    if isinstance(pattern, str):
        return field(default=pattern)
    return field(default_factory=lambda: list(pattern))
