"""Fold mergeable tuners into the frozen weights for free inference, and undo it.

Weight deltas (LoRA, Res-LoRA, RLRR, HTA, SNELL) add ``delta_weight()`` (and ``delta_bias()``) to their linear or to
its q/k/v row block; affine tuners fold into a neighbour: an "after" tuner (SSF) into the op it follows, a "before"
tuner (ARC) into the linear that reads its output (``fold_into``). Everything is computed in fp32 from the current
weights, checked for NaN/Inf, and only then written, cast back to each weight's dtype. After a full merge no restune
module or hook is left: the model is the plain timm model. ``unmerge`` restores the exact pre-merge weights and the
tuners from a record kept in this process (never in the model's state_dict).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from restune.binding import AttentionHost, TunerSet, TunerStore
from restune.sites import LINEAR, NORM, PATCH_EMBED, STORE_ATTR, Site, find_sites
from restune.tune import get_store
from restune.tuners.base import Binding, Tuner

__all__ = ["merge", "unmerge", "MergeResult", "is_mergeable"]


@dataclass
class MergeResult:
    """What ``merge`` did.

    Attributes:
        merged: the tuners folded into frozen weights.
        skipped: the tuners left in place (``partial=True``).
        weights: the frozen tensors that changed.
        kept: backbone tensors the set trained (BitFit's biases): they already are the weights, nothing to fold.
    """

    merged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


@dataclass
class _Record:
    store: TunerStore
    originals: dict[str, torch.Tensor]
    full: bool
    tables: list[tuple[Any, str, dict]] = field(default_factory=list)
    nodes: list[tuple[nn.Module, dict]] = field(default_factory=list)


_RECORDS: weakref.WeakKeyDictionary[nn.Module, _Record] = weakref.WeakKeyDictionary()


def is_mergeable(tuner: Tuner) -> bool:
    """Whether a tuner folds into frozen weights (input-dependent scales and branches do not)."""
    scale = getattr(tuner, "scale", None)
    if scale is not None and getattr(scale, "kind", None) == "gate":
        return False
    if tuner.binding is Binding.WEIGHT_DELTA:
        return True
    if tuner.binding is Binding.AFFINE:
        return tuner.position == "after" or hasattr(tuner, "fold_into")
    return False


def _label(key: str, tuner: Tuner) -> str:
    return f"{tuner.config.type} at {tuner.site_name}"


class _Plan:
    """New fp32 values of frozen tensors, accumulated before anything is written."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.params = {id(p): p for p in model.parameters()}
        self.values: dict[int, torch.Tensor] = {}

    def get(self, param: nn.Parameter) -> torch.Tensor:
        if id(param) not in self.values:
            self.values[id(param)] = param.detach().to(torch.float32).clone()
        return self.values[id(param)]

    def set(self, param: nn.Parameter, value: torch.Tensor) -> None:
        self.values[id(param)] = value


@contextmanager
def _fp32(tuner: Tuner) -> Iterator[None]:
    """Compute a tuner's fold in fp32 whatever its dtype; the round trip back to bf16/fp16 is exact."""
    dtypes = {t.dtype for t in list(tuner.parameters()) + list(tuner.buffers()) if t.is_floating_point()}
    if dtypes <= {torch.float32}:
        yield
        return
    original = dtypes.pop() if len(dtypes) == 1 else None
    tuner.float()
    try:
        yield
    finally:
        if original is not None:
            tuner.to(original)


def _fold_delta(plan: _Plan, site: Site, tuner: Tuner) -> None:
    linear = site.module
    rows = slice(*site.rows) if site.rows is not None else slice(None)
    weight = plan.get(linear.weight)
    weight[rows] += tuner.delta_weight().to(torch.float32)
    bias_delta = tuner.delta_bias()
    if bias_delta is not None:
        if linear.bias is None:
            raise ValueError(f"{tuner.config.type} at {site.name} shifts a bias, but the linear has none")
        plan.get(linear.bias)[rows] += bias_delta.to(torch.float32)


def _fold_after(plan: _Plan, site: Site, tuner: Tuner) -> None:
    scale, shift = tuner.scale.to(torch.float32), tuner.shift.to(torch.float32)
    module = site.module
    if site.kind == PATCH_EMBED:
        module = module.proj
    if site.kind in (LINEAR, PATCH_EMBED):
        weight = plan.get(module.weight)
        plan.set(module.weight, weight * scale.view(-1, *([1] * (weight.dim() - 1))))
    elif site.kind == NORM:
        plan.set(module.weight, plan.get(module.weight) * scale)
    else:
        raise ValueError(f"cannot fold {tuner.config.type} after a {site.kind} site ({site.name})")
    if module.bias is None:
        raise ValueError(f"{tuner.config.type} at {site.name} shifts a bias, but {site.name} has none")
    plan.set(module.bias, plan.get(module.bias) * scale + shift)


def _fold_before(plan: _Plan, site: Site, tuner: Tuner) -> None:
    linear = tuner.fold_target(site)
    weight, bias = tuner.fold_into(plan.get(linear.weight), plan.get(linear.bias) if linear.bias is not None else None)
    plan.set(linear.weight, weight)
    if linear.bias is not None:
        plan.set(linear.bias, bias)


def merge(model: nn.Module, *, partial: bool = False) -> MergeResult:
    """Fold the active set's mergeable tuners into the frozen weights.

    Args:
        model: a model tuned with ``restune.tune`` (one tuner set).
        partial: fold the mergeable tuners and leave the others in place instead of raising.

    Raises:
        ValueError: a non-mergeable tuner without ``partial``, a Bypass, several tuner sets, or a NaN/Inf in a merged
            weight (checked before anything changes).
    """
    from restune.bypass import Bypass

    if isinstance(model, Bypass):
        raise ValueError("a Bypass is a parallel network and does not merge; serve several tasks with MultiTask")
    store = get_store(model)
    if store is None:
        raise ValueError("this model has no restune tuners to merge")
    if len(store.sets) != 1:
        raise ValueError(
            f"merge works on a model with one tuner set; this one has {list(store.sets)}: save the sets, "
            "then merge a model that holds only the one to serve"
        )
    tuner_set: TunerSet = store.sets[store.active]
    tuners = tuner_set.named_tuners()
    skipped = [(k, t) for k, t in tuners if not is_mergeable(t)]
    if skipped and not partial:
        names = ", ".join(_label(k, t) for k, t in skipped)
        raise ValueError(f"not mergeable: {names}; pass partial=True to fold the others and keep these")
    chosen = [(k, t) for k, t in tuners if is_mergeable(t)]
    sites = find_sites(model)
    plan = _Plan(model)
    with torch.no_grad():
        for stage in (Binding.WEIGHT_DELTA, "after", "before"):
            for _, tuner in chosen:
                site = sites[tuner.site_name]
                with _fp32(tuner):
                    if stage is Binding.WEIGHT_DELTA and tuner.binding is Binding.WEIGHT_DELTA:
                        _fold_delta(plan, site, tuner)
                    elif tuner.binding is Binding.AFFINE and tuner.position == stage:
                        (_fold_after if stage == "after" else _fold_before)(plan, site, tuner)
        bad = [plan.names[i] for i, v in plan.values.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"merging would put NaN or Inf into {bad}; nothing was changed")
        originals = {plan.names[i]: plan.params[i].detach().clone() for i in plan.values}
        for i, value in plan.values.items():
            plan.params[i].copy_(value.to(plan.params[i].dtype))
    record = _Record(store, originals, full=not skipped)
    if record.full:
        store.detach_hooks()
        delattr(model, STORE_ATTR)
    else:
        _remove_tuners(store, tuner_set, [t for _, t in chosen], record)
    _RECORDS[model] = record
    return MergeResult(
        [_label(k, t) for k, t in chosen],
        [_label(k, t) for k, t in skipped],
        sorted(originals),
        list(tuner_set.backbone_names),
    )


def _remove_tuners(store: TunerStore, tuner_set: TunerSet, removed: list[Tuner], record: _Record) -> None:
    ids = {id(t) for t in removed}
    for host in store.hosts.values():
        tables = ("entries",) if isinstance(host, AttentionHost) else ("entries", "before", "after")
        for table_name in tables:
            table = getattr(host, table_name)
            record.tables.append((host, table_name, {k: list(v) for k, v in table.items()}))
            for set_name, entries in table.items():
                table[set_name] = [e for e in entries if id(e[0] if isinstance(e, tuple) else e) not in ids]
    for node in list(tuner_set.tuners.modules()):
        record.nodes.append((node, dict(node._modules)))
        for name, child in list(node._modules.items()):
            if id(child) in ids:
                del node._modules[name]


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge`` in the same process: the exact pre-merge weights and tuners come back (outputs bitwise equal).

    Raises:
        ValueError: this model was not merged in this process (e.g. it was reloaded from disk); load its tuner
            checkpoint instead.
    """
    record = _RECORDS.pop(model, None)
    if record is None:
        raise ValueError(
            "no merge of this model is recorded in this process (was it reloaded from disk?); "
            "unmerge needs the model merge() returned from; load the tuner checkpoint instead"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in record.originals.items():
            params[name].copy_(value)
    if record.full:
        model.add_module(STORE_ATTR, record.store)
        record.store.attach_hooks()
    else:
        for host, table_name, table in record.tables:
            getattr(host, table_name).clear()
            getattr(host, table_name).update(table)
        for node, modules in record.nodes:
            node._modules.clear()
            node._modules.update(modules)
    return model
