"""The configuration of one training run, from defaults, a recipe, a YAML file, flags and ``key=value`` overrides.

Precedence, lowest first: the dataclass defaults, the recipe (for the fields left unset), ``-c config.yaml``, command
line flags, then ``key=value`` overrides. The resolved values are written to the run folder so a run can be repeated
and resumed from its own record.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from restune.harness.recipes import RECIPES, Recipe, recipe_for

__all__ = [
    "TrainConfig",
    "PROTOCOLS",
    "FLAG_GROUPS",
    "apply_overrides",
    "load_yaml",
    "resolved_recipe",
    "SPLITS",
    "parse_scalar",
]

# protocol -> (training split, evaluation split), the protocols of docs/methods/README.md.
SPLITS = {"final": ("train800val200", "test"), "paper": ("train800val200", "test"), "val": ("train800", "val200")}
PROTOCOLS = tuple(SPLITS)
METRICS = {
    "final": "test accuracy at the last epoch",
    "paper": "max test accuracy over epochs: test-selected, as in the official code",
    "val": "val200 accuracy at the last epoch, trained on train800 (hyper-parameter selection run)",
}
# Fields that may differ between a run and its resumption.
NOT_IDENTITY = {"resume", "output", "progress", "num_workers"}
FLOAT_FIELDS = ("lr", "weight_decay", "drop_path")
NORMALIZATIONS = ("imagenet", "model", "none")  # restune.data.NORMALIZATIONS, kept here so the config needs no torch
#: The argument groups of ``restune train --help``, in order; every field names one in its metadata.
FLAG_GROUPS = ("model", "data", "training", "output")


def parse_scalar(text: str) -> Any:
    """A command-line value: int, then float (``1e-3``, which YAML 1.1 reads as a string), then any YAML scalar."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def _setting(
    default: Any,
    group: str,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    commands: Sequence[str] = ("train", "sweep"),
) -> Any:
    """A field with its command-line flag described beside it (``restune.harness.cli`` generates the flags).

    Args:
        default: The field's default (the flag itself defaults to None, so a YAML file and the recipe show through).
        group: One of :data:`FLAG_GROUPS`.
        help: The flag's help text, describing the flag (``--no-progress`` for the ``progress`` field).
        choices: The values the flag accepts, when they are a closed set.
        commands: The subcommands that take the flag; a sweep sets the task, the tuner and the run folders itself.
    """
    if group not in FLAG_GROUPS:
        raise ValueError(f"flag group {group!r} is not one of {FLAG_GROUPS}")
    metadata = {
        "group": group,
        "help": help,
        "choices": tuple(choices) if choices else None,
        "commands": tuple(commands),
    }
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """One run. ``None`` means "the recipe's value".

    Each field's metadata holds its flag's group, help, choices and commands (see ``_setting``); the flags of
    ``restune train`` and ``restune sweep`` are generated from it, so a new setting is one line here.

    Attributes:
        model: a timm model name (``restune_vit_tiny`` loads the weights shipped with restune).
        pretrained_file: local .safetensors/.pth (timm's file overlay) or Google .npz weights; none: random init.
        random_init: start from random weights even where restune ships pretrained ones (the transfer baseline).
        tuner: a preset, a bypass preset (``res_tuning_bypass``) or a YAML spec path.
        recipe: ``default`` (FacT/NOAH) or ``paper`` (the method's own code base, where known).
        data_dir, dataset: the folder holding the task folders, and the task.
        num_classes: the head's classes, checked against every label; unset: the VTAB-1k count for the 19 VTAB
            folder names, else inferred from the lists (or the class folders).
        protocol: ``final``, ``paper`` or ``val`` (see ``METRICS``).
        amp: bf16 autocast on GPU (ignored on CPU).
        grad_accum: optimizer steps every this many batches; ``batch_size`` is the global batch of one micro-step.
        bypass_cache: train a Bypass from features extracted once (needs a deterministic input pipeline).
        normalization: ``imagenet``, ``model`` or ``none``; unset: the recipe's.
        img_size: input size when the model should run at another resolution than its default.
    """

    model: str = _setting("restune_vit_tiny", "model", "timm model name (default restune_vit_tiny, shipped pretrained)")
    pretrained_file: str | None = _setting(
        None, "model", "local .safetensors/.pth (timm file overlay) or Google .npz weights"
    )
    random_init: bool = _setting(False, "model", "ignore shipped weights (baseline)")
    tuner: str = _setting(
        "res_tuning", "model", "preset, bypass preset or YAML spec (default res_tuning)", commands=("train",)
    )
    recipe: str = _setting(
        "default", "training", "default (FacT/NOAH) or paper (the method's own code)", choices=RECIPES
    )
    data_dir: str | None = _setting(
        None, "data", "folder holding the task folders (VTAB-1k lists or ImageFolder trees)"
    )
    dataset: str | None = _setting(None, "data", "task folder name inside --data-dir", commands=("train",))
    num_classes: int | None = _setting(None, "data", "head size, checked against the labels (default: inferred)")
    protocol: str = _setting("final", "training", "final (default), paper or val", choices=PROTOCOLS)
    epochs: int | None = _setting(None, "training", "training epochs (default: the recipe's)")
    batch_size: int | None = _setting(None, "training", "global batch size (split over processes)")
    lr: float | None = _setting(None, "training", "peak learning rate (default: the recipe's)")
    weight_decay: float | None = _setting(None, "training", "AdamW weight decay (default: the recipe's)")
    warmup_epochs: int | None = _setting(None, "training", "linear warmup epochs (default: the recipe's)")
    drop_path: float | None = _setting(None, "training", "backbone stochastic depth (default: the recipe's)")
    seed: int = _setting(0, "training", "seed of initialisation, shuffling and augmentation (default 0)")
    amp: bool = _setting(False, "training", "bf16 autocast on GPU")
    grad_accum: int = _setting(1, "training", "batches per optimizer step")
    output: str | None = _setting(None, "output", "run folder (sweep: the sweep folder)")
    resume: bool = _setting(False, "output", "continue the run in --output", commands=("train",))
    bypass_cache: bool = _setting(False, "training", "train a Bypass from features")
    normalization: str | None = _setting(None, "data", "default: the recipe's", choices=NORMALIZATIONS)
    img_size: int | None = _setting(None, "model", "input size, when not the model's default")
    num_workers: int = _setting(0, "data", "data loader worker processes (default 0)")
    device: str = _setting("auto", "training", "auto (default), cpu or cuda")
    progress: bool = _setting(True, "output", "no progress bars")

    def __post_init__(self) -> None:
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError(f"{name} must be a number, got {value!r}") from None
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
            setattr(self, name, None if value is None else float(value))
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe {self.recipe!r} is unknown; use one of {', '.join(RECIPES)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r} is unknown; use one of {', '.join(PROTOCOLS)}")
        for name in ("epochs", "batch_size", "warmup_epochs", "grad_accum", "num_classes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.grad_accum < 1 or 0 in (self.batch_size, self.epochs, self.num_classes):
            raise ValueError("grad_accum, batch_size, epochs and num_classes must be at least 1")

    @property
    def train_split(self) -> str:
        return SPLITS[self.protocol][0]

    @property
    def eval_split(self) -> str:
        return SPLITS[self.protocol][1]

    @property
    def metric(self) -> str:
        return METRICS[self.protocol]

    def preset_name(self) -> str:
        """The tuner's short name for tables: the preset, or the YAML file's stem."""
        return Path(self.tuner).stem if self.tuner.endswith((".yaml", ".yml")) else self.tuner

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that define what a run computes (a resumed run must agree on all of them)."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_IDENTITY}


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _check_keys(keys: list[str], source: str) -> None:
    names = _field_names()
    unknown = [k for k in keys if k not in names]
    if unknown:
        hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise ValueError(f"{source}: unknown setting(s) {said}; known: {', '.join(names)}")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a ``-c`` file: a mapping of TrainConfig fields (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    _check_keys(list(data), f"config file {path}")
    return data


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (values parsed as YAML scalars: ``lr=1e-2``, ``amp=true``)."""
    values = dict(values)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. lr=0.01)")
        key = key.strip().replace("-", "_")
        _check_keys([key], "override")
        values[key] = parse_scalar(text) if text else None
    return values


def resolved_recipe(config: TrainConfig) -> Recipe:
    """The recipe for this run with the user's explicit values on top."""
    recipe = recipe_for(config.recipe, config.preset_name(), config.dataset or "")
    changes = {
        name: getattr(config, name)
        for name in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "drop_path", "normalization")
        if getattr(config, name) is not None
    }
    recipe = recipe.replace(**changes)
    if recipe.warmup_epochs and recipe.warmup_epochs >= recipe.epochs:
        if config.warmup_epochs is not None:
            raise ValueError(f"warmup_epochs ({recipe.warmup_epochs}) must be below epochs ({recipe.epochs})")
        recipe = recipe.replace(warmup_epochs=recipe.epochs // 10)  # the recipe's 10 of 100, scaled to a short run
    return recipe
