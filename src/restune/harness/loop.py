"""The training loop of ``restune train``: one file a reader can hold in their head (nanoGPT's habit).

AdamW, linear warmup then cosine, optional clipping and accumulation, bf16 autocast on GPU, torchrun DDP. Shuffling
comes from (seed, epoch) through ``DistributedSampler`` and every epoch reseeds the global RNG, so a run resumed from
its last epoch checkpoint continues exactly as if it had not stopped. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

import restune
from restune.atomic import atomic_write, atomic_write_text
from restune.bypass import Bypass
from restune.features import CacheKey, FeatureCache, extract
from restune.harness import distributed, run_files
from restune.harness.build import build_model, count, open_split, param_groups, transforms_for
from restune.harness.config import TrainConfig, resolved_recipe
from restune.harness.recipes import Recipe
from restune.harness.run_files import SUMMARY_FIELDS

# atomic_write_text is re-exported: older callers import it from here (restune.atomic is its home).
__all__ = ["train", "lr_at", "SUMMARY_FIELDS", "evaluate", "atomic_write_text", "write_summary"]

STATE_FILE = run_files.STATE


def lr_at(recipe: Recipe, t: float) -> float:
    """The learning rate at epoch position ``t``: linear warmup, cosine to ``min_lr``, then ``min_lr`` (cooldown)."""
    if t < recipe.warmup_epochs:
        return recipe.warmup_lr + (recipe.lr - recipe.warmup_lr) * t / recipe.warmup_epochs
    if t >= recipe.epochs:
        return recipe.min_lr
    progress = (t - recipe.warmup_epochs) / max(1e-12, recipe.epochs - recipe.warmup_epochs)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1.0 + math.cos(math.pi * progress))


class _FromFeatures(nn.Module):
    """A Bypass reading cached features, as a module DDP can wrap (its forward must go through DDP to sync)."""

    def __init__(self, bypass: Bypass) -> None:
        super().__init__()
        self.bypass = bypass

    def forward(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        return self.bypass.logits_from_features(features)


class _CachedFeatures(Dataset):
    """Items of a feature cache, as (features dict, label) pairs the default collate stacks."""

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> tuple[dict[int, torch.Tensor], int]:
        features, labels = self.cache.batch(torch.tensor([index]))
        return {k: v[0] for k, v in features.items()}, int(labels[0])


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def _cached(
    bypass: Bypass, dataset: Any, transform: Any, path: Path, context: distributed.Context, progress: bool
) -> Dataset:
    """Features of a split, extracted once by rank 0 (or reused when the cache on disk matches) and shared.

    The cache is keyed on every item *with its label*: a relabelled list (same images, corrected labels) must not
    train on the labels stored beside the old features.
    """
    items = [f"{item}\t{label}" for item, label in zip(dataset.items, dataset.targets, strict=True)]
    key = CacheKey.expected(bypass, items, transform, torch.float32)
    if context.is_main:
        try:
            FeatureCache.load(path, key)
        except (FileNotFoundError, ValueError):
            loader = DataLoader(dataset, batch_size=64, shuffle=False)
            extract(bypass, loader, items=items, transform=transform, path=path, progress=progress)
    distributed.barrier(context)
    return _CachedFeatures(FeatureCache.load(path, key))


def evaluate(model: nn.Module, dataset: Dataset, context: distributed.Context, batch_size: int, amp: bool) -> float:
    """Top-1 accuracy in percent; each rank scores every world-th item and the counts are summed."""
    model.eval()
    shard = Subset(dataset, range(context.rank, len(dataset), context.world))
    correct = total = 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and context.device.type == "cuda")
    with torch.no_grad(), autocast:
        for inputs, labels in DataLoader(shard, batch_size=batch_size, shuffle=False):
            logits = model(_to(inputs, context.device))
            correct += int((logits.argmax(-1).cpu() == labels).sum())
            total += len(labels)
    correct, total = distributed.all_sum(context, correct, total)
    return 100.0 * correct / max(1.0, total)


def _evaluates(config: TrainConfig, recipe: Recipe, epoch: int, total: int) -> bool:
    if epoch == total - 1:
        return True
    if config.protocol != "paper":
        return False
    return (epoch + 1) % recipe.eval_every == 0 or epoch >= total - recipe.eval_last


def _check_resumable(run_dir: Path, config: TrainConfig) -> None:
    saved = yaml.safe_load((run_dir / run_files.CONFIG).read_text())["run"]
    mine = config.identity()
    different = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    if different:
        said = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in different.items())
        raise ValueError(f"--resume: {run_dir} was started with other settings ({said}); use the same ones")


def _prepare_folder(run_dir: Path, config: TrainConfig, recipe: Recipe, context: distributed.Context) -> bool:
    """Create or check the run folder; True when a training state is there to resume."""
    resumable = (run_dir / STATE_FILE).is_file()
    if resumable and config.resume:
        _check_resumable(run_dir, config)
        return True
    if (resumable or (run_dir / run_files.SUMMARY).exists()) and not config.resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, or another --output")
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"run": config.to_dict(), "recipe": {**recipe.__dict__, "no_decay": list(recipe.no_decay)}}
        atomic_write_text(run_dir / run_files.CONFIG, yaml.safe_dump(record, sort_keys=False))
    distributed.barrier(context)
    return False


def _save_state(path: Path, epoch: int, model: nn.Module, optimizer: Any, history: list[dict]) -> None:
    trainable = {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}
    state = {"epoch": epoch, "trainable": trainable, "optimizer": optimizer.state_dict(), "history": history}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load_state(path: Path, model: nn.Module, optimizer: Any) -> tuple[int, list[dict]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), list(state["history"])


def _summary(config: TrainConfig, recipe: Recipe, model: nn.Module, history: list[dict], test_images: int) -> dict:
    evaluated = [(row["eval_acc"], row["epoch"]) for row in history if row["eval_acc"] is not None]
    if config.protocol == "paper":
        accuracy, best = max(evaluated, key=lambda pair: (pair[0], -pair[1]))
    else:
        accuracy, best = evaluated[-1]
    trainable, head = count(model)
    row = {
        "task": config.dataset, "preset": config.preset_name(), "model": config.model, "protocol": config.protocol,
        "metric": config.metric, "accuracy": round(accuracy, 4), "best_epoch": best, "epochs": len(history),
        "trainable": trainable, "trainable_without_head": trainable - head, "head": head,
        "num_classes": int(model.get_classifier().out_features), "lr": recipe.lr, "weight_decay": recipe.weight_decay,
        "batch_size": recipe.batch_size, "seed": config.seed, "recipe": recipe.name, "test_images": test_images,
    }  # fmt: skip
    differ = set(row) ^ set(SUMMARY_FIELDS)  # the schema (run_files) and this writer must name the same columns
    assert not differ, f"summary row and run_files.SUMMARY_FIELDS differ in {sorted(differ)}"
    return {name: row[name] for name in SUMMARY_FIELDS}


def write_summary(path: Path, row: dict) -> None:
    """Write a run's one-row summary.csv atomically (the sweep rewrites it to name the val protocol)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


def train(config: TrainConfig) -> dict[str, Any]:
    """Run one training job end to end and return its summary row (also written to ``summary.csv``)."""
    context = distributed.setup(config.device)
    try:
        return _train(config, context)
    finally:
        distributed.teardown(context)


def _train(config: TrainConfig, context: distributed.Context) -> dict[str, Any]:
    recipe = resolved_recipe(config)
    if recipe.batch_size % context.world:
        raise ValueError(f"batch size {recipe.batch_size} does not split over {context.world} processes evenly")
    if context.world > 1 and context.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // context.world))
    run_dir = Path(config.output or f"runs/{config.dataset}-{config.preset_name()}-{config.protocol}-s{config.seed}")
    resuming = _prepare_folder(run_dir, config, recipe, context)
    train_set = open_split(config, config.train_split)
    torch.manual_seed(config.seed)
    model = build_model(config, train_set.num_classes, recipe).to(context.device)
    train_tf, eval_tf = transforms_for(model, recipe)
    train_set.transform = train_tf
    eval_set = open_split(config, config.eval_split, eval_tf, num_classes=train_set.num_classes)
    runner: nn.Module = model
    if config.bypass_cache:
        if not isinstance(model, Bypass):
            raise ValueError(f"--bypass-cache trains a Bypass from features; {config.tuner!r} is not a bypass tuner")
        cache = run_dir / run_files.CACHE
        train_set = _cached(model, train_set, train_tf, cache / config.train_split, context, config.progress)
        eval_set = _cached(model, eval_set, eval_tf, cache / config.eval_split, context, config.progress)
        runner = _FromFeatures(model)
    wrapped = DistributedDataParallel(runner) if context.world > 1 else runner
    optimizer = torch.optim.AdamW(param_groups(model, recipe), lr=recipe.lr)
    start, history = _load_state(run_dir / STATE_FILE, model, optimizer) if resuming else (0, [])

    per_rank = recipe.batch_size // context.world
    sampler = DistributedSampler(train_set, context.world, context.rank, shuffle=True, seed=config.seed)
    loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=config.num_workers)
    accum = config.grad_accum
    updates_per_epoch = math.ceil(len(loader) / accum)
    total = recipe.epochs + recipe.cooldown_epochs
    amp = config.amp and context.device.type == "cuda"
    show = config.progress and context.is_main
    for epoch in tqdm(range(start, total), desc="epochs", initial=start, total=total, disable=not show):
        began = time.perf_counter()
        torch.manual_seed((config.seed * 1_000_003 + epoch) * 101 + context.rank)  # dropout, flips: from (seed, epoch)
        sampler.set_epoch(epoch)
        runner.train()
        loss_sum = correct = seen = 0.0
        optimizer.zero_grad(set_to_none=True)
        for index, (inputs, labels) in enumerate(
            tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not show)
        ):
            group = index // accum
            t = epoch + (group / updates_per_epoch if recipe.schedule_per == "step" else 0.0)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr_at(recipe, t)
            group_size = min(accum, len(loader) - group * accum)
            last_in_group = (index + 1) % accum == 0 or index + 1 == len(loader)
            sync = contextlib.nullcontext() if last_in_group or context.world == 1 else wrapped.no_sync()
            inputs, labels = _to(inputs, context.device), labels.to(context.device)
            with sync, torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                logits = wrapped(inputs).float()
                loss = F.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)
                (loss / group_size).backward()
            if last_in_group:
                if recipe.clip_grad:
                    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], recipe.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += float(loss.detach()) * len(labels)
            correct += float((logits.argmax(-1) == labels).sum())
            seen += len(labels)
        loss_sum, correct, seen = distributed.all_sum(context, loss_sum, correct, seen)
        evaluates = _evaluates(config, recipe, epoch, total)
        eval_acc = evaluate(runner, eval_set, context, 2 * per_rank, config.amp) if evaluates else None
        history.append({
            "epoch": epoch + 1, "step": (epoch + 1) * updates_per_epoch, "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
            "eval_split": config.eval_split if evaluates else None, "eval_acc": eval_acc,
            "seconds": time.perf_counter() - began,
        })  # fmt: skip
        if context.is_main:
            _save_state(run_dir / STATE_FILE, epoch + 1, model, optimizer, history)
            atomic_write_text(run_dir / run_files.METRICS, "".join(json.dumps(row) + "\n" for row in history))
    row = _summary(config, recipe, model, history, len(eval_set))
    if context.is_main:
        restune.save(model, run_dir / run_files.TUNERS)
        write_summary(run_dir / run_files.SUMMARY, row)
    distributed.barrier(context)
    return row
