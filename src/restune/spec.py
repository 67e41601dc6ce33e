r"""One spec system: what ``restune.tune``, ``restune.Bypass`` and ``restune.build`` accept, resolved to one object.

A spec is a preset name, a YAML file, a dict, a tuner config, a list of configs, or a spec object. Every spec object
has a ``kind``: ``tuners`` (a ``TuneSpec``: tuners attached to the model itself) or ``bypass`` (a ``BypassConfig``,
registered by ``restune.bypass``: a Res-Tuning-Bypass beside the frozen model). Both serialise with ``to_dict()``
(which records the kind) and come back through ``resolve``; presets of both kinds live in one registry.

YAML schema of a ``tuners`` spec (every key but ``tuners`` optional)::

    tuners:                       # one entry per tuner; 'type' is a registered tuner name
      - type: res_prefix
        sites: 'blocks\.\d+\.attn'   # regex on the whole dotted name, or a list of names / dotted suffixes
        length: 10
      - type: res_adapter
        sites: 'blocks\.\d+\.mlp'
        layers: [6, 7, 8, 9, 10, 11]
        dim: 32
        scale: scale_channel
    head: train                   # train (default) | freeze
    train: ["cls_token"]          # backbone tensors to train too: regex string or list of names / suffixes

A file may instead name a preset and change nothing else (``preset: res_tuning``), or hold a bypass spec
(``kind: bypass`` with the ``BypassConfig`` fields; ``type: bypass`` is read too).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from restune.contract import TunerConfig, config_from_dict, get_preset, presets, register_spec_kind, spec_kinds

__all__ = ["TuneSpec", "resolve", "resolve_spec", "spec_kind_of", "SPEC_FORMAT_VERSION", "TUNERS"]

SPEC_FORMAT_VERSION = 1
HEAD_MODES = ("train", "freeze")
TUNERS = "tuners"


@dataclass
class TuneSpec:
    """A resolved tuning specification (kind ``tuners``).

    Attributes:
        tuners: the tuner configs, attached in order.
        head: ``train`` (the set trains its own head) or ``freeze``.
        train: backbone parameters the set also trains (regex string, or list of names / dotted suffixes).
        preset: the preset name this spec came from, for records only.
    """

    kind: ClassVar[str] = TUNERS
    tuners: list[TunerConfig] = field(default_factory=list)
    head: str = "train"
    train: str | list[str] | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.head not in HEAD_MODES:
            raise ValueError(f"spec: 'head' must be one of {HEAD_MODES}, got {self.head!r}")
        if not all(isinstance(t, TunerConfig) for t in self.tuners):
            raise TypeError("spec: 'tuners' must hold tuner config objects (use restune.spec.resolve for dicts)")
        if isinstance(self.train, Sequence) and not isinstance(self.train, str):
            self.train = list(self.train)

    def describe(self) -> str:
        """One line for tables: the tuner types, and the backbone tensors the spec trains."""
        parts = [t.type for t in self.tuners] + ([f"backbone {self.train}"] if self.train else [])
        return " + ".join(parts) or "head only"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, readable back by ``resolve``."""
        return {
            "kind": self.kind,
            "format_version": SPEC_FORMAT_VERSION,
            "preset": self.preset,
            "head": self.head,
            "train": self.train,
            "tuners": [t.to_dict() for t in self.tuners],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, family: str | None = None) -> TuneSpec:
        """A spec from ``to_dict`` output, a hand-written mapping, a single tuner entry or ``{"preset": name}``."""
        data = {k: v for k, v in data.items() if k not in ("format_version", "kind")}
        if "type" in data:  # a single tuner entry
            return cls([config_from_dict(data)])
        if data.get("preset") and "tuners" not in data:
            base = get_preset(data.pop("preset"), family=family)
            if not isinstance(base, cls):
                raise ValueError(f"spec: preset {base.preset!r} is a {base.kind} preset, not a tuners preset")
            unknown = sorted(set(data) - {"head", "train"})
            if unknown:
                raise ValueError(f"spec: unknown key(s) {unknown} next to 'preset'; allowed: head, train")
            return cls(base.tuners, data.get("head", base.head), data.get("train", base.train), base.preset)
        unknown = sorted(set(data) - {"tuners", "head", "train", "preset"})
        if unknown:
            raise ValueError(f"spec: unknown key(s) {unknown}; allowed: tuners, head, train, preset")
        entries = data.get("tuners")
        if not isinstance(entries, list):
            raise ValueError("spec: 'tuners' must be a list of tuner entries, each with a 'type'")
        tuners = [e if isinstance(e, TunerConfig) else config_from_dict(e) for e in entries]
        return cls(tuners, data.get("head", "train"), data.get("train"), data.get("preset"))


register_spec_kind(TuneSpec)


def spec_kind_of(data: dict[str, Any], default: str = TUNERS) -> str:
    """The kind a mapping declares (``kind``, or the older ``type: bypass``); ``default`` when it says none."""
    kind = data.get("kind")
    if kind is None and data.get("type") in spec_kinds() and data.get("type") != TUNERS:
        kind = data["type"]
    return kind or default


def _from_mapping(data: dict[str, Any], family: str | None, default_kind: str | None = None) -> Any:
    kind = spec_kind_of(data, default_kind or TUNERS)
    known = spec_kinds()
    if kind not in known:
        raise ValueError(f"spec: unknown kind {kind!r}; known kinds: {', '.join(known)}")
    spec_cls = known[kind]
    if kind == TUNERS:
        return spec_cls.from_dict(data, family=family)
    return spec_cls.from_dict(data)


def _from_text(text: str, family: str | None, kind: str | None) -> Any:
    if text in presets(family=family):
        return get_preset(text, family=family)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"spec file {text!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"spec file {text!r} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"spec file {text!r} must hold a mapping with a 'tuners' list (see restune.spec)")
        return _from_mapping(data, family)
    return get_preset(text, family=family, kind=kind)  # raises with the known presets and the closest names


def resolve(spec: Any, *, kind: str | None = None, family: str | None = None) -> Any:
    """Turn any accepted spec form into a spec object (a ``TuneSpec``, a ``BypassConfig``...).

    Args:
        spec: a preset name, a YAML path, a mapping, a tuner config, a list of configs or entries, or a spec object.
        kind: the kind the caller needs (``tuners`` for ``restune.tune``, ``bypass`` for ``restune.Bypass``); a spec
            of another kind raises, naming the call that takes it. None accepts any kind.
        family: the backbone family whose preset entries to prefer (None: the default family).

    Raises:
        ValueError: an unknown preset (with the list and the closest names), a YAML file that does not parse, bad
            keys, or a spec of another kind than ``kind``.
    """
    known = tuple(spec_kinds().values())
    if isinstance(spec, known):
        resolved = spec
    elif isinstance(spec, TunerConfig):
        resolved = TuneSpec([spec])
    elif isinstance(spec, dict):
        resolved = _from_mapping(spec, family, kind)
    elif isinstance(spec, (list, tuple)):
        resolved = TuneSpec([t if isinstance(t, TunerConfig) else config_from_dict(t) for t in spec])
    elif isinstance(spec, (str, os.PathLike)):
        resolved = _from_text(str(spec), family, kind)
    else:
        raise TypeError(
            f"cannot use {type(spec).__name__} as a spec: give a preset name, a config, a list or a YAML path"
        )
    if kind is not None and resolved.kind != kind:
        label = f"preset {resolved.preset!r}" if getattr(resolved, "preset", None) else "this spec"
        use = "restune.Bypass(backbone, spec, num_classes=...)" if resolved.kind == "bypass" else "restune.tune"
        raise ValueError(f"{label} is a {resolved.kind} spec, not a {kind} spec; use {use} (or restune.build)")
    return resolved


def resolve_spec(spec: Any, *, family: str | None = None) -> TuneSpec:
    """``resolve`` for ``restune.tune``: the spec must be of kind ``tuners``."""
    return resolve(spec, kind=TUNERS, family=family)
