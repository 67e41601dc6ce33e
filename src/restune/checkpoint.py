"""Tuner-only checkpoints: one safetensors file with a set's trainable tensors, one JSON describing them.

The frozen backbone is never saved: the JSON records which architecture the tensors fit and a fingerprint of the
frozen weights, so loading onto another backbone fails clearly and loading onto differently pretrained weights warns.
Each file is written atomically (``restune.atomic``) and the JSON, written last, records the weights' SHA-256, so a
write torn by a crash is detected on load instead of silently mixing two checkpoints. The JSON also records the spec
kind (``tuners`` or ``bypass``); saving and loading dispatch on it through one table each.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from restune.atomic import atomic_write
from restune.binding import TunerSet
from restune.bypass import BYPASS, Bypass
from restune.spec import TUNERS, TuneSpec, resolve
from restune.tune import (
    backbone_parameters,
    build_tuners,
    classifier_path,
    get_store,
    match_backbone,
    set_active,
    tune,
)

__all__ = ["save", "load", "architecture", "fingerprint", "CHECKPOINT_FORMAT_VERSION", "WEIGHTS_NAME", "CONFIG_NAME"]

CHECKPOINT_FORMAT_VERSION = 1
WEIGHTS_NAME = "tuners.safetensors"
CONFIG_NAME = "tuners.json"


def architecture(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint must match: the model class and its backbone's parameter names and shapes."""
    shapes = [(name, tuple(p.shape)) for name, p in backbone_parameters(model).items()]
    digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    blocks = getattr(model, "blocks", None)
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "name": cfg.get("architecture"),
        "embed_dim": getattr(model, "embed_dim", None),
        "depth": len(blocks) if blocks is not None else None,
        "num_heads": getattr(getattr(blocks[0], "attn", None), "num_heads", None) if blocks else None,
        "backbone_shapes": digest,
    }


def _describe(arch: dict[str, Any]) -> str:
    return f"{arch.get('name') or arch['class']} (embed_dim {arch['embed_dim']}, depth {arch['depth']})"


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of the frozen backbone weights as they were before any set trained some of them."""
    store = get_store(model)
    originals = store.original_backbone if store is not None else {}
    digest = hashlib.sha256()
    for name, param in sorted(backbone_parameters(model).items()):
        tensor = originals.get(name, param).detach()
        if tensor.is_meta:
            return "meta"
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _set_tensors(model: nn.Module, set_name: str) -> dict[str, torch.Tensor]:
    """Every trainable tensor of a set by checkpoint name, whether the set is active or not."""
    store = get_store(model)
    tuner_set = store.sets[set_name]
    tensors = {f"tuners.{k}": p for k, p in tuner_set.tuners.named_parameters()}
    active = store.active == set_name
    head_path = classifier_path(model)
    if tuner_set.trains_head and head_path is not None:
        head = model.get_submodule(head_path) if active else tuner_set.head
        tensors.update({f"head.{k}": p for k, p in head.named_parameters()})
    params = backbone_parameters(model)
    for name in tuner_set.backbone_names:
        tensors[f"backbone.{name}"] = params[name] if active else tuner_set.backbone_values[name]
    return tensors


def _planned_shapes(model: nn.Module, spec: TuneSpec) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a set built from ``spec`` would hold, computed without changing the model."""
    plan = TunerSet(spec, spec.head == "train", match_backbone(model, spec.train))
    for site, tuner_type, module in build_tuners(model, spec):
        plan.add(site.name, tuner_type, module)
    shapes = {f"tuners.{k}": tuple(p.shape) for k, p in plan.tuners.named_parameters()}
    head_path = classifier_path(model)
    if plan.trains_head and head_path is not None:
        shapes.update({f"head.{k}": tuple(p.shape) for k, p in model.get_submodule(head_path).named_parameters()})
    params = backbone_parameters(model)
    shapes.update({f"backbone.{n}": tuple(params[n].shape) for n in plan.backbone_names})
    return shapes


def _check_tensors(directory: Path, expected: dict[str, tuple[int, ...]], found: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(found)
        if tuple(found[k].shape) != expected[k]
    )
    if missing or unexpected or shapes:
        problems = [f"missing in checkpoint: {missing}"] * bool(missing)
        problems += [f"unexpected in checkpoint: {unexpected}"] * bool(unexpected)
        problems += [f"shape mismatch: {shapes}"] * bool(shapes)
        hint = " (a head shape mismatch means another num_classes: create the model with the checkpoint's)"
        raise ValueError(f"cannot load {directory}: " + "; ".join(problems) + (hint if shapes else ""))


def _check_architecture(directory: Path, meta: dict[str, Any], model: nn.Module) -> None:
    saved, arch = meta["architecture"], architecture(model)
    if any(saved.get(k) != arch.get(k) for k in ("class", "embed_dim", "depth", "num_heads", "backbone_shapes")):
        raise ValueError(
            f"checkpoint {directory} was made for {_describe(saved)}, but this model is {_describe(arch)}; "
            "create the model the checkpoint was made for"
        )


def _check_fingerprint(directory: Path, meta: dict[str, Any], model: nn.Module, strict: bool) -> None:
    current = fingerprint(model)
    if meta["fingerprint"] in (current, "meta") or current == "meta":
        return
    message = (
        f"the frozen weights of this model differ from those {directory} was trained on (fingerprint "
        f"{current[:12]} vs {meta['fingerprint'][:12]}); outputs will differ from the saved model's"
    )
    if strict:
        raise ValueError(message)
    warnings.warn(message, stacklevel=3)


def _write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    weights = directory / WEIGHTS_NAME
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    meta = {
        **meta,
        "weights_sha256": _sha256(weights),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(text))
    return directory


def _save_bypass(bypass: Bypass, directory: Path, name: str | None) -> Path:
    meta = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "kind": BYPASS,
        "config": bypass.config.to_dict(),
        "num_classes": bypass.num_classes,
        "architecture": architecture(bypass.backbone),
        "fingerprint": fingerprint(bypass.backbone),
    }
    return _write_checkpoint(directory, bypass.state_dict(), meta)


def _load_bypass(model: nn.Module, directory: Path, meta: dict[str, Any], name: str | None, strict: bool) -> nn.Module:
    config = resolve(meta["config"], kind=BYPASS)
    if isinstance(model, Bypass):
        same = {**model.config.to_dict(), "preset": None} == {**config.to_dict(), "preset": None}
        if not same or model.num_classes != meta["num_classes"]:
            raise ValueError(
                f"this Bypass was built with another config or head than {directory}; build it with "
                f"Bypass(backbone, {meta['config']}, num_classes={meta['num_classes']}) or pass the plain backbone"
            )
        backbone = model.backbone
    else:
        backbone = model
    _check_architecture(directory, meta, backbone)
    target = model if isinstance(model, Bypass) else Bypass(backbone, config, num_classes=meta["num_classes"])
    tensors = load_file(directory / WEIGHTS_NAME)
    _check_tensors(directory, {k: tuple(v.shape) for k, v in target.state_dict().items()}, tensors)
    _check_fingerprint(directory, meta, backbone, strict)
    target.load_state_dict(tensors, strict=True)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save(model: nn.Module, directory: str | os.PathLike, *, name: str | None = None) -> Path:
    """Write one tuner set (tuners, head, trainable backbone tensors) and its configs to ``directory``.

    Args:
        model: a model tuned with ``restune.tune``.
        directory: created if missing; other files in it are left alone.
        name: the set to save (default: the active one).

    Returns:
        The directory.
    """
    saver = _SAVERS[BYPASS if isinstance(model, Bypass) else TUNERS]
    return saver(model, Path(directory), name)


def _save_tuners(model: nn.Module, directory: Path, name: str | None) -> Path:
    if isinstance(model, Bypass):
        raise ValueError("a Bypass is saved as a bypass checkpoint; call restune.save(bypass, directory)")
    store = get_store(model)
    if store is None:
        raise ValueError("this model has no restune tuners to save; call restune.tune(model, spec) first")
    set_name = name or store.active
    if set_name not in store.sets:
        raise ValueError(f"no tuner set {set_name!r}; this model has {', '.join(store.sets)}")
    meta = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "kind": TUNERS,
        "set": set_name,
        "spec": store.sets[set_name].spec.to_dict(),
        "architecture": architecture(model),
        "fingerprint": fingerprint(model),
    }
    return _write_checkpoint(directory, _set_tensors(model, set_name), meta)


def _read_meta(directory: Path) -> dict[str, Any]:
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{directory} is not a restune checkpoint: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        meta = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config} is not valid JSON ({err}); the checkpoint is damaged") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{config}: checkpoint format {version!r} is not readable by this restune; upgrade restune")
    if meta.get("weights_sha256") != _sha256(weights):
        raise ValueError(f"{weights} does not match {config} (checksum differs): the checkpoint is torn or edited")
    return meta


def load(model: nn.Module, directory: str | os.PathLike, *, name: str | None = None, strict: bool = False) -> nn.Module:
    """Load a tuner set saved by ``restune.save`` and make it active (or a saved Bypass).

    If the model has no set of that name, the tuners are attached from the JSON first; otherwise the existing set
    must have been built from the same configs. Missing, unexpected or mis-shaped tensors always raise an error
    naming them; so does another architecture. Weights pretrained differently (another fingerprint) warn, or raise
    with ``strict=True``.

    Args:
        model: the backbone the checkpoint was made for (tuned or not).
        directory: a directory written by ``restune.save``.
        name: the set name to load into (default: the saved set's name).
        strict: raise instead of warning when the frozen weights differ from the ones the set was trained on.

    A Bypass checkpoint loads into a Bypass built with the same config, or onto a plain backbone, in which case a new
    Bypass is built on it and returned.

    Returns:
        The model (for a Bypass checkpoint on a plain backbone: the new Bypass).
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    kind = meta.get("kind", TUNERS)
    if kind not in _LOADERS:
        raise ValueError(f"{directory} holds a {kind!r} checkpoint; this restune reads {', '.join(_LOADERS)}")
    return _LOADERS[kind](model, directory, meta, name, strict)


def _load_tuners(model: nn.Module, directory: Path, meta: dict[str, Any], name: str | None, strict: bool) -> nn.Module:
    if isinstance(model, Bypass):
        raise ValueError(f"{directory} holds tuners for a timm model, not a Bypass; load it into the timm model")
    _check_architecture(directory, meta, model)
    set_name = name or meta["set"]
    spec = resolve(meta["spec"], kind=TUNERS)
    tensors = load_file(directory / WEIGHTS_NAME)
    store = get_store(model)
    attach = store is None or set_name not in store.sets
    if attach:
        _check_tensors(directory, _planned_shapes(model, spec), tensors)  # before the model changes at all
    else:
        have = [t.to_dict() for t in store.sets[set_name].spec.tuners]
        want = [t.to_dict() for t in spec.tuners]
        if have != want:
            raise ValueError(
                f"tuner set {set_name!r} of this model was built from other configs than {directory}:\n"
                f"  model: {have}\n  checkpoint: {want}\nload into a model without that set, or pass name=..."
            )
        _check_tensors(directory, {k: tuple(v.shape) for k, v in _set_tensors(model, set_name).items()}, tensors)
    _check_fingerprint(directory, meta, model, strict)
    if attach:
        tune(model, spec, name=set_name)
    else:
        set_active(model, set_name)
    with torch.no_grad():
        for key, target in _set_tensors(model, set_name).items():
            target.copy_(tensors[key])
    return model


# Spec kind -> how a checkpoint of that kind is written and read.
_SAVERS: dict[str, Callable[[Any, Path, str | None], Path]] = {TUNERS: _save_tuners, BYPASS: _save_bypass}
_LOADERS: dict[str, Callable[[nn.Module, Path, dict[str, Any], str | None, bool], nn.Module]] = {
    TUNERS: _load_tuners,
    BYPASS: _load_bypass,
}
