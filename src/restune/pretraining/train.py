"""Pretrain ``restune_vit_tiny`` on procedural fractals over procedural textures, on the CPU; write the weights.

Every image is an IFS fractal drawn over a random-wave texture (``restune.pretraining.textures``), and the one head
predicts both categories: cross-entropy on the fractal logits plus cross-entropy on the texture logits (label
smoothing 0.1). The texture half learns within the first few hundred steps, where fractal classification alone sat at
chance for whole CPU runs, and it asks for frequency and orientation features; the fractal half asks for shape. An
optional MaskFeat-style dense term (``--dense-weight``, ``restune.pretraining.objective``) predicts orientation
histograms of blanked patches; the shipped recipe does not use it. Every batch is rendered from ``(seed, step)``, so
the run needs no data files and never repeats an image. The defaults are the recipe of the shipped weights::

    python -m restune.pretraining.train --output src/restune/weights/restune_vit_tiny.safetensors
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from restune.atomic import atomic_write
from restune.pretraining.images import batch_rng, make_categories
from restune.pretraining.model import ARCH, FRACTAL_CLASSES, TEXTURE_CLASSES, build
from restune.pretraining.objective import ORIENTATION_BINS, mask_patches, patch_targets, random_patch_mask
from restune.pretraining.textures import make_textures, render_composites

__all__ = ["PretrainConfig", "pretrain", "to_tensor", "save_weights", "main"]


@dataclass
class PretrainConfig:
    """Everything that determines a pretraining run (recorded in the weight file's metadata)."""

    output: str
    steps: int = 3600
    batch_size: int = 128
    num_classes: int = FRACTAL_CLASSES
    texture_classes: int = TEXTURE_CLASSES
    seed: int = 0
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    label_smoothing: float = 0.1
    clip_grad: float = 1.0
    mask_ratio: float = 0.5
    dense_weight: float = 0.0
    embed_dim: int = ARCH["embed_dim"]
    depth: int = ARCH["depth"]
    num_heads: int = ARCH["num_heads"]
    eval_batches: int = 8
    threads: int = 2
    checkpoint: str | None = None
    checkpoint_every: int = 50
    log_every: int = 20


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC images to float NCHW normalised with mean = std = 0.5 (the model's pretrained config)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return x.sub_(0.5).div_(0.5).contiguous()


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# Drawing the category sets takes a chaos-game pass per candidate: once per run, not once per batch.
_categories = functools.lru_cache(maxsize=4)(make_categories)
_textures = functools.lru_cache(maxsize=4)(make_textures)


def _batch(config: PretrainConfig, index: int, *, heldout: bool = False) -> Batch:
    """(images, fractal labels, texture labels) of batch ``index``; categories are cached per (count, seed)."""
    images, fractal, texture = render_composites(
        _categories(config.num_classes, config.seed),
        _textures(config.texture_classes, config.seed),
        batch_rng(config.seed, index, heldout=heldout),
        config.batch_size,
        size=ARCH["img_size"],
    )
    return to_tensor(images), torch.from_numpy(fractal), torch.from_numpy(texture)


def _split(logits: torch.Tensor, fractal_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's first ``fractal_classes`` logits are the fractal's, the rest the texture's."""
    return logits[:, :fractal_classes], logits[:, fractal_classes:]


def _lr(config: PretrainConfig, step: int) -> float:
    """Linear warmup times a cosine over the whole run."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    return config.lr * warm * 0.5 * (1.0 + math.cos(math.pi * step / config.steps))


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Write the state dict as fp16 safetensors, atomically (a crash never leaves a half-written weight file).

    fp16 halves the shipped size; timm's loader copies into the float32 parameters, so a loaded model is float32.
    """
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    text = {k: json.dumps(v) for k, v in metadata.items()}
    # 0644 whatever the umask: a file shipped in the package must be readable by all.
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=text), mode=0o644)


@torch.no_grad()
def _accuracy(model: nn.Module, batches: list[Batch], fractal_classes: int) -> tuple[float, float]:
    """(fractal accuracy, texture accuracy) over ``batches``, in eval mode."""
    model.eval()
    fractal_hits = texture_hits = total = 0
    for x, fractal, texture in batches:
        fractal_logits, texture_logits = _split(model(x), fractal_classes)
        fractal_hits += int((fractal_logits.argmax(-1) == fractal).sum())
        texture_hits += int((texture_logits.argmax(-1) == texture).sum())
        total += len(fractal)
    return fractal_hits / max(total, 1), texture_hits / max(total, 1)


def pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) pretraining and write the weights; returns the summary that also goes into the metadata.

    Runs with ``config.threads`` torch threads (restored afterwards): 2 on an otherwise idle 2-core machine; on a
    shared one, two OpenMP threads spin against other processes, and 1 is faster.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _pretrain(config)
    finally:
        torch.set_num_threads(threads)


def _dense_loss(
    model: nn.Module, dense: nn.Module, x: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked-patch squared error, its no-skill baseline, the features of the masked input)."""
    patch = ARCH["patch_size"]
    with torch.no_grad():
        target = patch_targets(x, patch)
        masked = mask_patches(x, mask, patch)
        baseline = ((target - target.mean((0, 1))) ** 2).mean(-1)[mask].mean()
    features = model.forward_features(masked)
    error = ((dense(features[:, model.num_prefix_tokens :]) - target) ** 2).mean(-1)[mask].mean()
    return error, baseline, features


def _loss(model: nn.Module, dense: nn.Module, batch: Batch, config: PretrainConfig, ce: nn.Module) -> torch.Tensor:
    """Both categories' cross-entropies, plus the weighted masked-patch error when ``dense_weight`` is set."""
    x, fractal, texture = batch
    if config.dense_weight > 0:
        patches = (ARCH["img_size"] // ARCH["patch_size"]) ** 2
        error, _, features = _dense_loss(model, dense, x, random_patch_mask(len(x), patches, config.mask_ratio))
        extra = config.dense_weight * error
    else:
        features, extra = model.forward_features(x), torch.zeros(())
    fractal_logits, texture_logits = _split(model.forward_head(features), config.num_classes)
    return ce(fractal_logits, fractal) + ce(texture_logits, texture) + extra


def _pretrain(config: PretrainConfig) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    model = build(
        num_classes=config.num_classes + config.texture_classes,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
    )
    dense = nn.Linear(config.embed_dim, ORIENTATION_BINS + 3)  # dropped after pretraining
    params = list(model.parameters()) + list(dense.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ce = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    start, elapsed = 0, 0.0
    ckpt = Path(config.checkpoint) if config.checkpoint else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        dense.load_state_dict(state["dense"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
        print(f"resumed from {ckpt} at step {start}", flush=True)

    began = time.time() - elapsed
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="pretrain", mininterval=20)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr(config, step)
        loss = _loss(model, dense, _batch(config, step), config, ce)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, config.clip_grad)
        optimizer.step()
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            print(f"step {done}/{config.steps} loss {loss.item():.4f} elapsed {time.time() - began:.0f}s", flush=True)
        if ckpt is not None and (done % config.checkpoint_every == 0 or done == config.steps):
            state = dict(model=model.state_dict(), dense=dense.state_dict(), optimizer=optimizer.state_dict())
            state.update(rng=torch.get_rng_state(), step=done, elapsed=time.time() - began)
            atomic_write(ckpt, lambda tmp, state=state: torch.save(state, tmp))
    bar.close()
    summary = evaluate(model, dense if config.dense_weight > 0 else None, config)
    summary.update(train_wall_s=round(time.time() - began, 1))
    save_weights(model, config.output, summary)
    print(json.dumps(summary), flush=True)
    return summary


@torch.no_grad()
def evaluate(model: nn.Module, dense: nn.Module | None, config: PretrainConfig) -> dict[str, Any]:
    """Held-out and seen-batch accuracies of both heads, and the masked-patch R^2 when ``dense`` is given."""
    heldout = [_batch(config, i, heldout=True) for i in range(config.eval_batches)]
    seen = [_batch(config, i) for i in range(config.eval_batches)]
    model.eval()
    heldout_fractal, heldout_texture = _accuracy(model, heldout, config.num_classes)
    train_fractal, train_texture = _accuracy(model, seen, config.num_classes)
    summary: dict[str, Any] = dict(
        config=asdict(config),
        parameters=sum(p.numel() for p in model.parameters()),
        heldout_fractal_acc=heldout_fractal,
        heldout_texture_acc=heldout_texture,
        train_fractal_acc=train_fractal,
        train_texture_acc=train_texture,
        eval_images=config.eval_batches * config.batch_size,
    )
    if dense is not None:
        generator_state = torch.get_rng_state()
        torch.manual_seed(config.seed + 1)
        patches = (ARCH["img_size"] // ARCH["patch_size"]) ** 2
        masks = [random_patch_mask(len(x), patches, config.mask_ratio) for x, _, _ in heldout]
        errors = [_dense_loss(model, dense, x, mask) for (x, _, _), mask in zip(heldout, masks, strict=True)]
        torch.set_rng_state(generator_state)
        summary["heldout_masked_patch_r2"] = 1.0 - float(sum(e for e, _, _ in errors) / sum(b for _, b, _ in errors))
    model.train()
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: every ``PretrainConfig`` field is a ``--flag``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, field in PretrainConfig.__dataclass_fields__.items():
        flag = "--" + name.replace("_", "-")
        if name == "output":
            parser.add_argument(flag, required=True)
        elif name == "checkpoint":
            parser.add_argument(flag, default=None)
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)
    return pretrain(PretrainConfig(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
