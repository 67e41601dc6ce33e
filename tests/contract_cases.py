"""The cases of the contract suite, read from the registries, and the helpers its two test files share.

Every tuner type with its config's defaults (``type:<name>``), every preset ``restune.tune`` takes
(``preset:<name>``) and every Bypass preset (``bypass:<name>``): a new tuner or preset is covered by registering it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from conftest import make_vit, randn_like
from torch import nn

import restune
import restune.tuners
from restune import contract
from restune.sites import STORE_ATTR
from restune.spec import TUNERS, TuneSpec, resolve
from restune.tune import classifier_path, get_store, match_backbone

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# The cases, read from the registries at collection time.
# ---------------------------------------------------------------------------------------------------------------

TYPE_CASES = [f"type:{name}" for name in contract.tuner_names()]
PRESET_CASES = [f"preset:{name}" for name in restune.presets()]
BYPASS_CASES = [f"bypass:{name}" for name in restune.presets(kind="bypass")]
TUNER_CASES = TYPE_CASES + PRESET_CASES
ALL_CASES = TUNER_CASES + BYPASS_CASES
# The training step runs with the spec's own head and with the head frozen (a Bypass always trains its new head).
STEP_CASES = [(case, "spec") for case in ALL_CASES] + [(case, "freeze") for case in TUNER_CASES]

META_VITS = ("vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224")
NUM_CLASSES = 5  # the tiny ViT's head
LABELS = torch.tensor([1, 3])


def spec_of(case: str) -> Any:
    """A fresh spec for a case: a tuner type's default config, a preset, or a Bypass preset."""
    kind, name = case.split(":", 1)
    if kind == "type":
        return TuneSpec([contract.get_tuner(name).config_cls()])
    return resolve(name, kind="bypass" if kind == "bypass" else TUNERS)


def build(case: str, *, head: str | None = None, backbone: nn.Module | None = None) -> tuple[nn.Module, Any]:
    """(model, spec): the tiny ViT tuned with the case's spec (``head`` overrides the spec's), or its Bypass."""
    spec = spec_of(case)
    if head is not None:
        spec.head = head
    model = restune.build(make_vit(0) if backbone is None else backbone, spec, num_classes=NUM_CLASSES)
    return model.eval(), spec


def logits(model: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return model.eval()(images)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def tuner_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """The tuners' own tensors (a tuned model's ``restune.*``, a Bypass's ``bypass.*``), else every trainable one."""
    prefix = "bypass." if isinstance(model, restune.Bypass) else f"{STORE_ATTR}."
    own = {name: p for name, p in trainable(model).items() if name.startswith(prefix)}
    return own or trainable(model)


def perturb_(params: dict[str, nn.Parameter], seed: int, std: float = 0.1) -> None:
    """Add seeded N(0, std^2) noise to each tensor (its own draw), so zero-initialised tensors matter too."""
    with torch.no_grad():
        for offset, (_, param) in enumerate(sorted(params.items())):
            param.add_(randn_like(param, seed + offset, std))


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of the model, cloned."""
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


def expected_trainable(model: nn.Module, spec: Any) -> set[str]:
    """What the spec says trains: the tuners, the head when ``head: train`` and the backbone tensors in ``train``.

    For a Bypass: what it declares trainable (its bypass and head, never the backbone).
    """
    if isinstance(model, restune.Bypass):
        declared = {id(p) for p in model.trainable_parameters()}
        return {name for name, p in model.named_parameters() if id(p) in declared}
    names = {name for name, _ in model.named_parameters() if name.startswith(f"{STORE_ATTR}.")}
    head = classifier_path(model)
    if spec.head == "train" and head is not None:
        names |= {name for name, _ in model.named_parameters() if name.startswith(f"{head}.")}
    return names | set(match_backbone(model, spec.train))


def adamw_step(model: nn.Module, images: Tensor) -> dict[str, Tensor | None]:
    """One AdamW step (lr 1e-2, default weight decay) on a cross-entropy loss in training mode; the gradients."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(list(trainable(model).values()), lr=1e-2)
    F.cross_entropy(model.train()(images), LABELS).backward()
    grads = {name: None if p.grad is None else p.grad.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    model.eval()
    return grads


def starts_exactly(model: nn.Module) -> bool:
    """Whether every tuner of the active set declares an exact start (``Tuner.starts_at_pretrained``)."""
    store = get_store(model)
    assert store is not None
    return all(tuner.starts_at_pretrained for _, tuner in store.sets[store.active].named_tuners())


@contextmanager
def no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def tuner_keys(model: nn.Module) -> list[str]:
    store = get_store(model)
    assert store is not None
    return [key for key, _ in store.sets[store.active].named_tuners()]
