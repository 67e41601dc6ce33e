"""Attach tuners to a model, switch between named sets, and switch them off.

The model stays the user's own ``nn.Module`` (torchtune style): tuners live under ``model.restune`` and act through
hooks (``restune.binding``), the head stays at its timm attribute, and ``restune.tune`` returns the same object.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from restune.binding import AttentionHost, ModuleHost, TokenHost, TunerSet, TunerStore
from restune.contract import Binding, Tuner, get_tuner
from restune.sites import STORE_ATTR, Site, find_sites, match_sites
from restune.spec import TuneSpec, resolve_spec

__all__ = [
    "tune",
    "set_active",
    "disabled",
    "get_store",
    "tuner_sets",
    "classifier_path",
    "backbone_parameters",
    "build_tuners",
    "match_backbone",
]

_SET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def get_store(model: nn.Module) -> TunerStore | None:
    """The model's tuner store, or None if ``restune.tune`` was never called on it."""
    store = getattr(model, STORE_ATTR, None)
    return store if isinstance(store, TunerStore) else None


def _require_store(model: nn.Module) -> TunerStore:
    store = get_store(model)
    if store is None:
        raise ValueError("this model has no restune tuners; call restune.tune(model, spec) first")
    return store


def tuner_sets(model: nn.Module) -> list[str]:
    """Names of the model's tuner sets, in creation order."""
    store = get_store(model)
    return list(store.sets) if store is not None else []


def classifier_path(model: nn.Module) -> str | None:
    """Dotted attribute path of ``model.get_classifier()``, or None for a model without one."""
    if not hasattr(model, "get_classifier"):
        return None
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head and name:
            return name
    return None


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def backbone_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's own parameters, without restune's tuners and without the classifier head."""
    head = classifier_path(model)
    return {
        name: param
        for name, param in model.named_parameters()
        if name.split(".")[0] != STORE_ATTR and not (head and (name == head or name.startswith(head + ".")))
    }


def match_backbone(model: nn.Module, pattern: str | list[str] | None) -> list[str]:
    """Names of the backbone parameters a spec's ``train`` entry selects (same rules as site patterns)."""
    if not pattern:
        return []
    names = list(backbone_parameters(model))
    if isinstance(pattern, str):
        chosen = [n for n in names if re.fullmatch(pattern, n)]
    else:
        chosen = [n for n in names if any(n == key or n.endswith("." + key) for key in pattern)]
    if not chosen:
        raise ValueError(f"spec 'train': {pattern!r} matched no backbone parameter; e.g. {', '.join(names[:6])}")
    return chosen


def build_tuners(model: nn.Module, spec: TuneSpec) -> list[tuple[Site, str, Tuner]]:
    """Create (not attach) every tuner a spec asks for, so every error is raised before the model changes."""
    sites = find_sites(model)
    if not sites:
        raise ValueError(
            f"{type(model).__name__} has no site restune can bind to; it expects a timm VisionTransformer-like model "
            "(blocks with attn/mlp/norm1/norm2, linear layers)"
        )
    if not spec.tuners and spec.head == "freeze" and not spec.train:
        raise ValueError("spec trains nothing: no tuners, the head frozen and no backbone tensor in 'train'")
    built = []
    for config in spec.tuners:
        entry = get_tuner(config.type)
        entry.module_cls.check_model(model)
        matched = match_sites(sites, config.sites, config.layers, entry.module_cls.site_kinds, who=config.type)
        modules = entry.module_cls.build_all(config, matched)
        built += [(site, config.type, module) for site, module in zip(matched, modules, strict=True)]
    _check_tokens([(site, module) for site, _, module in built if module.binding is Binding.TOKENS])
    return built


def _check_tokens(built: list[tuple[Site, Tuner]]) -> None:
    """One token tuner per block and one prompt length per set: later blocks replace the first block's tokens."""
    seen: set[str] = set()
    for site, _ in built:
        if site.name in seen:
            raise ValueError(f"two token tuners on {site.name}: a block takes one set of prompt tokens")
        seen.add(site.name)
    lengths = {module.added_tokens for _, module in built}
    if len(lengths) > 1:
        raise ValueError(f"token tuners of one set must share one prompt length, got {sorted(lengths)}")


def tune(model: nn.Module, spec: Any, *, name: str = "default") -> nn.Module:
    """Freeze the backbone and attach a named set of tuners; return the same model.

    Args:
        model: a timm vision transformer (or any model with the same module structure).
        spec: a preset name, a tuner config, a list of configs, a ``TuneSpec``, a dict or a YAML file path.
        name: the set's name. A new name adds a set and makes it active; one set is active at a time.

    The head keeps its values. The first set trains (or freezes) the model's own head module; every later set
    that trains the head gets its own copy of the head as it was before the first ``tune`` (peft's
    ``modules_to_save``), swapped in by ``set_active``.
    """
    spec = resolve_spec(spec)
    if not isinstance(name, str) or not _SET_NAME.match(name):
        raise ValueError(f"tuner set name {name!r} must be an identifier (letters, digits, '_' or '-')")
    store = get_store(model)
    if store is not None and name in store.sets:
        raise ValueError(f"model already has a tuner set {name!r}; choose another name or call restune.set_active")
    if store is None and hasattr(model, STORE_ATTR):
        raise ValueError(f"model already has an attribute {STORE_ATTR!r} that is not restune's; cannot attach tuners")
    built = build_tuners(model, spec)
    owned = match_backbone(model, spec.train)
    head_path = classifier_path(model)
    if store is None:
        for param in model.parameters():
            param.requires_grad_(False)
        store = TunerStore()
        if head_path is not None:
            store.__dict__["original_head"] = copy.deepcopy(model.get_submodule(head_path)).requires_grad_(False)
        model.add_module(STORE_ATTR, store)
        first = True
    else:
        first = False

    tuner_set = TunerSet(spec, trains_head=spec.head == "train", backbone_names=owned)
    for site, tuner_type, module in built:
        tuner_set.add(site.name, tuner_type, module)
        if module.binding is Binding.ATTENTION_BRANCH:
            store.host(site.attention, AttentionHost).add(name, module)
        elif module.binding is Binding.TOKENS:
            store.host(model, TokenHost).add(name, module, site.layer)
        else:
            store.host(site.module, ModuleHost).add(name, module, site.rows)
    params = dict(model.named_parameters())
    for param_name in owned:
        if param_name not in store.original_backbone:
            store.original_backbone[param_name] = params[param_name].detach().clone()
        tuner_set.backbone_values[param_name] = store.original_backbone[param_name].clone()
    if head_path is not None and not first:
        current = model.get_submodule(head_path)
        head = copy.deepcopy(store.original_head).to(device=_device_of(current), dtype=_dtype_of(current))
        tuner_set.add_module("head", head)
    tuner_set.train(model.training)  # an eval model gets eval tuners (no live dropout)
    store.sets[name] = tuner_set
    set_active(model, name)
    return model


def _device_of(module: nn.Module) -> torch.device | None:
    return next((p.device for p in module.parameters()), None)


def _dtype_of(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _assign(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(device=param.device, dtype=param.dtype)


def set_active(model: nn.Module, name: str) -> None:
    """Make the named set the one that runs and trains.

    Only the active set's tuners (and its head copy and backbone tensors, when it trains them) require grad; build
    the optimizer after switching.
    """
    store = _require_store(model)
    if name not in store.sets:
        raise ValueError(f"no tuner set {name!r}; this model has {', '.join(store.sets) or 'none'}")
    old = store.sets[store.active] if store.active is not None else None
    new = store.sets[name]
    head_path = classifier_path(model)
    if old is not new:
        if head_path is not None and hasattr(new, "head"):
            current = model.get_submodule(head_path)
            incoming = new.head
            del new.head
            if old is not None:
                old.add_module("head", current.requires_grad_(False))
            _set_module(model, head_path, incoming)
        params = dict(model.named_parameters())
        for param_name, original in store.original_backbone.items():
            param = params[param_name]
            if old is not None and param_name in old.backbone_names:
                old.backbone_values[param_name] = param.data
            _assign(param, new.backbone_values.pop(param_name) if param_name in new.backbone_names else original)
    store.active = name
    for set_name, tuner_set in store.sets.items():
        for param in tuner_set.tuners.parameters():
            param.requires_grad_(set_name == name)
    params = dict(model.named_parameters())
    for param_name in store.original_backbone:
        params[param_name].requires_grad_(param_name in new.backbone_names)
    if head_path is not None:
        model.get_submodule(head_path).requires_grad_(new.trains_head)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the model computes exactly what it computed before the first ``tune``.

    Tuners are switched off, the original head is swapped in and every backbone tensor a set trains gets its
    original values back; everything is restored on exit, even after an exception.
    """
    store = get_store(model)
    if store is None:  # never tuned: it already computes what it computed before
        yield model
        return
    head_path = classifier_path(model)
    current_head = model.get_submodule(head_path) if head_path is not None else None
    params = dict(model.named_parameters())
    saved = {name: params[name].data for name in store.original_backbone}
    was_enabled = store.enabled
    store.enabled = False
    try:
        if current_head is not None and store.original_head is not None:
            original = store.original_head.to(device=_device_of(current_head), dtype=_dtype_of(current_head))
            _set_module(model, head_path, original)
        for name, value in store.original_backbone.items():
            _assign(params[name], value)
        yield model
    finally:
        store.enabled = was_enabled
        if current_head is not None:
            _set_module(model, head_path, current_head)
        for name, value in saved.items():
            params[name].data = value
