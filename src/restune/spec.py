r"""What ``restune.tune`` accepts, resolved to one form: a preset name, a config, a list, a dict or a YAML file.

YAML schema (every key but ``tuners`` optional)::

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

A file may instead name a preset and change nothing else: ``preset: res_tuning``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from restune.tuners.base import TunerConfig, config_from_dict

__all__ = ["TuneSpec", "resolve_spec", "SPEC_FORMAT_VERSION"]

SPEC_FORMAT_VERSION = 1
HEAD_MODES = ("train", "freeze")


@dataclass
class TuneSpec:
    """A resolved tuning specification.

    Attributes:
        tuners: the tuner configs, attached in order.
        head: ``train`` (the set trains its own head) or ``freeze``.
        train: backbone parameters the set also trains (regex string, or list of names / dotted suffixes).
        preset: the preset name this spec came from, for records only.
    """

    tuners: list[TunerConfig] = field(default_factory=list)
    head: str = "train"
    train: str | list[str] | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.head not in HEAD_MODES:
            raise ValueError(f"spec: 'head' must be one of {HEAD_MODES}, got {self.head!r}")
        if not all(isinstance(t, TunerConfig) for t in self.tuners):
            raise TypeError("spec: 'tuners' must hold tuner config objects (use resolve_spec for dicts)")
        if isinstance(self.train, Sequence) and not isinstance(self.train, str):
            self.train = list(self.train)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, readable back by ``resolve_spec``."""
        return {
            "format_version": SPEC_FORMAT_VERSION,
            "preset": self.preset,
            "head": self.head,
            "train": self.train,
            "tuners": [t.to_dict() for t in self.tuners],
        }


def _from_mapping(data: dict[str, Any]) -> TuneSpec:
    data = dict(data)
    data.pop("format_version", None)
    if "type" in data:  # a single tuner entry
        return TuneSpec([config_from_dict(data)])
    if "preset" in data and data.get("preset") and "tuners" not in data:
        from restune.presets import get_preset

        base = get_preset(data.pop("preset"))
        unknown = sorted(set(data) - {"head", "train"})
        if unknown:
            raise ValueError(f"spec: unknown key(s) {unknown} next to 'preset'; allowed: head, train")
        return TuneSpec(base.tuners, data.get("head", base.head), data.get("train", base.train), base.preset)
    unknown = sorted(set(data) - {"tuners", "head", "train", "preset"})
    if unknown:
        raise ValueError(f"spec: unknown key(s) {unknown}; allowed: tuners, head, train, preset")
    entries = data.get("tuners")
    if not isinstance(entries, list):
        raise ValueError("spec: 'tuners' must be a list of tuner entries, each with a 'type'")
    tuners = [e if isinstance(e, TunerConfig) else config_from_dict(e) for e in entries]
    return TuneSpec(tuners, data.get("head", "train"), data.get("train"), data.get("preset"))


def resolve_spec(spec: Any) -> TuneSpec:
    """Turn any accepted spec form into a ``TuneSpec``.

    Raises:
        ValueError: an unknown preset (with the list of presets), a YAML file that does not parse, or bad keys.
    """
    if isinstance(spec, TuneSpec):
        return spec
    if isinstance(spec, TunerConfig):
        return TuneSpec([spec])
    if isinstance(spec, dict):
        return _from_mapping(spec)
    if isinstance(spec, (list, tuple)):
        return TuneSpec([t if isinstance(t, TunerConfig) else config_from_dict(t) for t in spec])
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec)
        from restune.presets import get_preset, presets

        if text in presets():
            return get_preset(text)
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
            return _from_mapping(data)
        get_preset(text)  # raises with the known presets and the closest names
    raise TypeError(f"cannot use {type(spec).__name__} as a spec: give a preset name, a config, a list or a YAML path")
