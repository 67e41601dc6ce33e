"""Fold mergeable tuners into the frozen weights for free inference, and undo it.

Each mergeable tuner folds itself through the contract's one protocol, ``Tuner.fold(site, plan)``: weight deltas
(LoRA, Res-LoRA, RLRR, HTA, SNELL) add ``delta_weight()`` (and ``delta_bias()``) to their linear or to its q/k/v row
block; affine tuners fold into a neighbour: an "after" tuner (SSF) into the op it follows, a "before" tuner (ARC) into
the linear that reads its output. Lower ``fold_order`` folds first. Everything is computed in fp32 from the current
weights, checked for NaN/Inf, and only then written, cast back to each weight's dtype. After a full merge no restune
module or hook is left: the model is the plain timm model. ``unmerge`` restores the exact pre-merge weights and the
tuners from a record kept in this process (never in the model's state_dict).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from restune.binding import TunerSet, TunerStore
from restune.bypass import Bypass
from restune.contract import Tuner
from restune.sites import STORE_ATTR, find_sites
from restune.tune import get_store

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
    restores: list[Callable[[], None]] = field(default_factory=list)
    nodes: list[tuple[nn.Module, dict]] = field(default_factory=list)


_RECORDS: weakref.WeakKeyDictionary[nn.Module, _Record] = weakref.WeakKeyDictionary()


def is_mergeable(tuner: Tuner) -> bool:
    """Whether a tuner folds into frozen weights (its declared ``mergeable`` capability)."""
    return tuner.mergeable


def _label(tuner: Tuner) -> str:
    return f"{tuner.config.type} at {tuner.site_name}"


class _Plan:
    """New fp32 values of frozen tensors, accumulated before anything is written (a ``FoldPlan``)."""

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


def merge(model: nn.Module, *, partial: bool = False) -> MergeResult:
    """Fold the active set's mergeable tuners into the frozen weights.

    Args:
        model: a model tuned with ``restune.tune`` (one tuner set).
        partial: fold the mergeable tuners and leave the others in place instead of raising.

    Raises:
        ValueError: a non-mergeable tuner without ``partial``, a Bypass, several tuner sets, or a NaN/Inf in a merged
            weight (checked before anything changes).
    """
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
        names = ", ".join(_label(t) for _, t in skipped)
        raise ValueError(f"not mergeable: {names}; pass partial=True to fold the others and keep these")
    chosen = [(k, t) for k, t in tuners if is_mergeable(t)]
    sites = find_sites(model)
    plan = _Plan(model)
    with torch.no_grad():
        # Stable sort: within one order the tuners fold in attachment order.
        for _, tuner in sorted(chosen, key=lambda pair: pair[1].fold_order):
            with _fp32(tuner):
                tuner.fold(sites[tuner.site_name], plan)
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
        [_label(t) for _, t in chosen],
        [_label(t) for _, t in skipped],
        sorted(originals),
        list(tuner_set.backbone_names),
    )


def _remove_tuners(store: TunerStore, tuner_set: TunerSet, removed: list[Tuner], record: _Record) -> None:
    ids = {id(t) for t in removed}
    record.restores = [host.unregister(removed) for host in store.hosts.values()]
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
        for restore in record.restores:
            restore()
        for node, modules in record.nodes:
            node._modules.clear()
            node._modules.update(modules)
    return model
