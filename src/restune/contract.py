"""The contract every tuner implements, and the registries of tuner types, presets and spec kinds.

A tuner is one file: a validated ``@dataclass`` config whose defaults reproduce the paper, a ``Tuner`` module built
as ``Tuner(config, site)``, one ``register_tuner`` call and the ``register_preset`` calls of its presets. Everything
another module needs to know about a tuner (can it merge and how, does it mix tokens, can it answer for the first
tokens only, how many tokens does it add, what does its input go through first, how many parameters does it have)
is declared here with a default, so no module has to probe a tuner's attribute names. This module imports nothing
of restune but ``sites`` and ``layers``: the registries sit below every implementation, which is what keeps the
import graph free of cycles.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from restune.layers.scale import Scale
from restune.sites import Site

__all__ = [
    "Binding",
    "TunerConfig",
    "Tuner",
    "TunerType",
    "FoldPlan",
    "register_tuner",
    "unregister_tuner",
    "get_tuner",
    "tuner_names",
    "config_from_dict",
    "register_preset",
    "unregister_preset",
    "get_preset",
    "presets",
    "preset_families",
    "register_spec_kind",
    "spec_kinds",
    "positive_int",
    "default_sites",
    "CONFIG_FORMAT_VERSION",
    "DEFAULT_FAMILY",
]

CONFIG_FORMAT_VERSION = 1
DEFAULT_FAMILY = "default"


class Binding(str, Enum):
    """How a tuner attaches to its site (docs/design.md, "Bindings")."""

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


def default_sites(pattern: str | list[str]) -> Any:
    """A dataclass default for ``sites``: strings directly, lists through a factory."""
    if isinstance(pattern, str):
        return field(default=pattern)
    return field(default_factory=lambda: list(pattern))


class FoldPlan(Protocol):
    """New fp32 values of frozen tensors, accumulated by ``Tuner.fold`` before merge writes anything."""

    def get(self, param: nn.Parameter) -> torch.Tensor:
        """The planned fp32 value of a frozen tensor (its current value until a fold changed it); mutable."""
        ...

    def set(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Replace the planned value of a frozen tensor."""
        ...


class Tuner(nn.Module):
    """Base class of tuner modules.

    A subclass sets ``binding`` and the site kinds it accepts, builds its parameters from ``(config, site)`` on the
    site's device and dtype, and implements the method its binding calls:

    - parallel and weight-delta tuners: ``forward(x)`` returns what is added to the site's output;
    - attention-branch tuners: ``branch(q, attention)`` returns the extra attention term before ``W_o``; those that
      set ``joins_softmax`` instead give ``keys_values(attention)`` that join the backbone's own keys and values;
    - affine tuners: ``forward(x)`` returns the transformed input (``position = "before"``) or output ("after");
    - sequential tuners: ``forward(output)`` returns the site's new output;
    - token tuners: ``forward(batch)`` returns the (batch, ``added_tokens``, D) tokens to put in the sequence.

    The capabilities below have defaults that fit most tuners; a tuner overrides the ones that differ. Other modules
    only ever read these, never a tuner's own attribute names.
    """

    binding: ClassVar[Binding]
    site_kinds: ClassVar[frozenset[str]]
    position: ClassVar[str] = "after"  # affine tuners only: transform the site's input ("before") or output ("after")
    joins_softmax: ClassVar[bool] = False  # attention-branch tuners whose keys join the backbone's softmax
    first_tokens_supported: ClassVar[bool] = False  # forward(x, first_tokens=n) answers for the first n tokens only
    fold_order: ClassVar[int] = 0  # merge folds lower orders first: weight deltas 0, affine-after 1, affine-before 2

    def __init__(self, config: TunerConfig, site: Site) -> None:
        super().__init__()
        self.config = config
        self.site_name = site.name

    # -- building ---------------------------------------------------------------------------------------------

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

    @classmethod
    def parameter_count(cls, config: TunerConfig, sites: list[Site]) -> int | None:
        """The trainable parameters ``build_all(config, sites)`` creates, from the method's formula (None: undeclared).

        The contract tests compare it with the built modules on several model sizes, so a formula in a docstring
        cannot drift from the code.
        """
        return None

    # -- capabilities -----------------------------------------------------------------------------------------

    @property
    def gated(self) -> bool:
        """Whether a Res-Tuner scale of this tuner depends on its input (the ``gate`` option)."""
        return any(isinstance(m, Scale) and m.depends_on_input for m in self.modules())

    @property
    def mixes_tokens(self) -> bool:
        """Whether one token's output depends on other tokens (attention, a token-averaged gate, added tokens)."""
        return self.gated

    @property
    def answers_first_tokens(self) -> bool:
        """Whether ``forward(x, first_tokens=n)`` gives exactly the first n rows of ``forward(x)``."""
        return self.first_tokens_supported and not self.gated

    @property
    def starts_at_pretrained(self) -> bool:
        """Whether, as built, this tuner leaves its site's output exactly unchanged (a zero-initialised branch).

        Methods whose official initialisation moves the model at step 0 (RLRR's Kaiming scales, VPT's tokens) say
        False; ``restune.disabled`` gives the pretrained model back for every tuner either way.
        """
        return False

    @property
    def added_tokens(self) -> int:
        """Tokens a token tuner puts into the sequence (0 for every other binding)."""
        return 0

    @property
    def input_transform(self) -> nn.Module | None:
        """A module the host applies to the site's input before this tuner reads it.

        Tuners of one host holding the same transform object get one application per forward, i.e. one shared draw
        (SNELL's q, k and v branches share one dropout mask, as one Dropout precedes all three in the official code).
        """
        return None

    @property
    def mergeable(self) -> bool:
        """Whether ``fold`` can put this tuner into the frozen weights (input-dependent scales never can)."""
        if self.gated:
            return False
        return self.binding is Binding.WEIGHT_DELTA or type(self).fold is not Tuner.fold

    # -- merging ----------------------------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """The weight delta in PyTorch (out, in) layout, for weight-delta tuners."""
        raise TypeError(f"{type(self).__name__} on {self.site_name} is not mergeable")

    def delta_bias(self) -> torch.Tensor | None:
        """The bias delta of a weight-delta tuner that also shifts the bias (RLRR's f), else None."""
        return None

    def fold(self, site: Site, plan: FoldPlan) -> None:
        """Put this tuner into the planned frozen tensors of ``site``.

        The default serves every weight-delta tuner: ``delta_weight()`` (and ``delta_bias()``) are added to the
        linear, or to its q/k/v row block. Affine tuners override it (SSF folds into the op before it, ARC into the
        linear after it).
        """
        if self.binding is not Binding.WEIGHT_DELTA:
            raise TypeError(f"{type(self).__name__} on {self.site_name} is not mergeable")
        linear = site.module
        rows = slice(*site.rows) if site.rows is not None else slice(None)
        plan.get(linear.weight)[rows] += self.delta_weight().to(torch.float32)
        bias_delta = self.delta_bias()
        if bias_delta is not None:
            if linear.bias is None:
                raise ValueError(f"{self.config.type} at {site.name} shifts a bias, but the linear has none")
            plan.get(linear.bias)[rows] += bias_delta.to(torch.float32)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The tensors this tuner trains (fixed constants are buffers and never appear here)."""
        return list(self.parameters())

    def extra_repr(self) -> str:
        return f"site={self.site_name}"


# -- tuner types ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TunerType:
    """One registry entry."""

    name: str
    config_cls: type[TunerConfig]
    module_cls: type[Tuner]


_TUNERS: dict[str, TunerType] = {}


def register_tuner(name: str, config_cls: type[TunerConfig], module_cls: type[Tuner]) -> None:
    """Make a tuner available by name to specs, presets, YAML files and checkpoints."""
    if not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"tuner names are lower-case identifiers, got {name!r}")
    if name in _TUNERS:
        raise ValueError(f"tuner {name!r} is already registered (by {_TUNERS[name].module_cls.__name__})")
    config_cls.type = name
    _TUNERS[name] = TunerType(name, config_cls, module_cls)


def unregister_tuner(name: str) -> TunerType:
    """Remove a tuner type (and return its entry); for plug-ins and tests that register temporary tuners."""
    if name not in _TUNERS:
        raise KeyError(f"tuner {name!r} is not registered")
    return _TUNERS.pop(name)


def tuner_names() -> list[str]:
    """Every registered tuner type, sorted."""
    return sorted(_TUNERS)


def get_tuner(name: str) -> TunerType:
    """The registry entry for ``name``; an unknown name raises with the closest known names."""
    if name not in _TUNERS:
        close = difflib.get_close_matches(name, list(_TUNERS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown tuner type {name!r}.{hint} Known tuner types: {', '.join(tuner_names())}")
    return _TUNERS[name]


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


# -- presets --------------------------------------------------------------------------------------------------

# preset name -> family -> a function returning a fresh spec (a TuneSpec, a BypassConfig or any registered kind).
_PRESETS: dict[str, dict[str, Callable[[], Any]]] = {}


def register_preset(name: str, build: Callable[[], Any], *, family: str = DEFAULT_FAMILY) -> None:
    """Add a named preset: ``build()`` returns a fresh spec of any registered kind.

    ``family`` lets one name mean different things on different backbone families (``lora`` is split q and v at
    r = 8 on a ViT, another set of targets elsewhere): a family's own entry wins over the default one there.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"preset names are non-empty strings, got {name!r}")
    entries = _PRESETS.setdefault(name, {})
    if family in entries:
        raise ValueError(f"preset {name!r} is already registered for family {family!r}")
    entries[family] = build


def unregister_preset(name: str, *, family: str = DEFAULT_FAMILY) -> None:
    """Remove one family's entry of a preset (the name goes when its last entry does)."""
    entries = _PRESETS.get(name, {})
    if family not in entries:
        raise KeyError(f"preset {name!r} has no entry for family {family!r}")
    del entries[family]
    if not entries:
        del _PRESETS[name]


def presets(*, kind: str | None = None, family: str | None = None) -> list[str]:
    """Preset names in registration order; ``kind`` keeps those of one spec kind (``tuners`` or ``bypass``)."""
    names = [n for n, entries in _PRESETS.items() if family is None or family in entries or DEFAULT_FAMILY in entries]
    if kind is None:
        return names
    return [n for n in names if _preset_kind(n, family) == kind]


def preset_families(name: str) -> list[str]:
    """The families a preset has its own entry for (``default`` included when it has one)."""
    return list(_PRESETS.get(name, {}))


def _entry(name: str, family: str | None) -> Callable[[], Any] | None:
    entries = _PRESETS.get(name, {})
    return entries.get(family or DEFAULT_FAMILY) or entries.get(DEFAULT_FAMILY)


def _preset_kind(name: str, family: str | None) -> str | None:
    build = _entry(name, family)
    if build is None:
        return None
    return getattr(type(build()), "kind", None)


def get_preset(name: str, *, family: str | None = None, kind: str | None = None) -> Any:
    """A fresh spec for a preset (the family's own entry, else the default one); unknown names raise helpfully.

    ``kind`` only shapes the error: the caller wants a preset of that kind, so the message lists those first.
    """
    build = _entry(name, family) if isinstance(name, str) else None
    if build is None:
        known = presets(kind=kind, family=family) if kind else list(_PRESETS)
        close = difflib.get_close_matches(str(name), known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        label = f"{kind} preset" if kind and kind != "tuners" else "preset"
        listing = f"{label[0].upper()}{label[1:]}s: {', '.join(known)}"
        raise ValueError(f"unknown {label} {name!r}.{hint} {listing}; or give a YAML spec path")
    spec = build()
    spec.preset = name
    return spec


# -- spec kinds -----------------------------------------------------------------------------------------------

_SPEC_KINDS: dict[str, type] = {}


def register_spec_kind(spec_cls: type) -> type:
    """Make a spec class resolvable: it declares ``kind``, ``to_dict()`` (which records the kind) and ``from_dict``."""
    kind = getattr(spec_cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{spec_cls.__name__} must declare a class attribute 'kind' naming its spec kind")
    for method in ("to_dict", "from_dict"):
        if not callable(getattr(spec_cls, method, None)):
            raise ValueError(f"{spec_cls.__name__} must define {method}() to be a spec kind")
    if kind in _SPEC_KINDS and _SPEC_KINDS[kind] is not spec_cls:
        raise ValueError(f"spec kind {kind!r} is already registered (by {_SPEC_KINDS[kind].__name__})")
    _SPEC_KINDS[kind] = spec_cls
    return spec_cls


def spec_kinds() -> dict[str, type]:
    """Spec kind -> spec class, in registration order."""
    return dict(_SPEC_KINDS)
