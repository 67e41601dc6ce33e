"""Feature caches for bypass training (docs/methods/res-tuning.md, the Bypass's feature cache).

With a deterministic input pipeline and a frozen backbone in eval mode, the features a Bypass reads never change,
so they are extracted once and the Bypass trains from the cache: a step becomes a few small matrix products. With
class-token pruning a cache holds (L + 1) x D values per image (about 40 KB for ViT-B in fp32).

A cache records what it was made from (a hash of the backbone weights, the transform, the dtype, the ordered item
list, the feature layout and the library versions) and refuses to be used with anything else. It is written into a
temporary folder (each file through :func:`restune.atomic.atomic_write`, so it is on disk before the folder is) and
the folder is renamed when complete, so a half-written cache is never read. On disk each feature is one raw array,
memory-mapped on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from restune.atomic import atomic_write, atomic_write_text
from restune.bypass import Bypass
from restune.checkpoint import fingerprint
from restune.version import __version__

__all__ = ["CacheKey", "FeatureCache", "extract", "train_from_cache", "check_deterministic", "describe_transform"]

CACHE_FORMAT_VERSION = 1
_RANDOM_NAMES = (
    "Random",
    "ColorJitter",
    "AutoAugment",
    "RandAugment",
    "TrivialAugment",
    "AugMix",
    "GaussianBlur",
    "ElasticTransform",
    "Mixup",
    "CutMix",
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _walk(transform: Any) -> Iterable[Any]:
    yield transform
    for child in getattr(transform, "transforms", None) or []:
        yield from _walk(child)


def check_deterministic(transform: Any) -> None:
    """Raise if a transform (or anything inside a Compose) draws random numbers: its features cannot be cached."""
    for part in _walk(transform):
        name = type(part).__name__
        if any(name.startswith(r) or r in name for r in _RANDOM_NAMES):
            raise ValueError(
                f"the input pipeline has random augmentation ({name}); its features change every epoch and cannot "
                "be cached. Use a deterministic transform (resize + normalise) or train the Bypass live"
            )


def describe_transform(transform: Any) -> str:
    """A stable text description of a transform (or the string itself), recorded in the cache."""
    if transform is None:
        return "none"
    return transform if isinstance(transform, str) else " ".join(repr(transform).split())


def _items_hash(items: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """Everything a cache must match to be used."""

    backbone: str
    transform: str
    dtype: str
    items: str
    count: int
    keys: tuple[int, ...]
    class_token_only: bool
    versions: tuple[tuple[str, str], ...]

    @classmethod
    def expected(cls, bypass: Bypass, items: Sequence[str], transform: Any, dtype: torch.dtype) -> CacheKey:
        versions = (("restune", __version__), ("timm", timm.__version__), ("torch", torch.__version__))
        return cls(
            backbone=fingerprint(bypass.backbone),
            transform=describe_transform(transform),
            dtype=str(dtype).removeprefix("torch."),
            items=_items_hash(items),
            count=len(items),
            keys=tuple(bypass.keys),
            class_token_only=bypass.token_mode == "class",
            versions=versions,
        )

    def mismatches(self, other: CacheKey) -> list[str]:
        """Names of the fields that differ, with both values, for a refusal message."""
        names = {"backbone": "backbone weights", "items": "ordered item list", "keys": "feature layout (blocks)"}
        out = []
        for key, mine in asdict(self).items():
            theirs = asdict(other)[key]
            if mine != theirs:
                out.append(f"{names.get(key, key)}: cache has {str(mine)[:60]!r}, expected {str(theirs)[:60]!r}")
        return out


def _write_array(tensor: torch.Tensor, path: Path) -> None:
    """Raw bytes of a tensor, readable back with ``torch.from_file`` (works for bf16, which numpy lacks)."""
    raw = tensor.detach().contiguous().cpu().view(torch.uint8).numpy()
    atomic_write(path, lambda tmp: raw.tofile(tmp))


class FeatureCache:
    """Per-block features and labels of an ordered dataset, in memory or memory-mapped from disk."""

    def __init__(self, features: dict[int, torch.Tensor], labels: torch.Tensor, key: CacheKey) -> None:
        self.features = features
        self.labels = labels
        self.key = key

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Features (as fp32) and labels of some items."""
        return {k: v[indices].float() for k, v in self.features.items()}, self.labels[indices]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache as raw arrays + JSON into a temporary folder, then rename it into place."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            layout = {}
            for key, tensor in self.features.items():
                _write_array(tensor, tmp / f"x{key}.bin")
                layout[str(key)] = list(tensor.shape)
            _write_array(self.labels.to(torch.int64), tmp / "labels.bin")
            meta = {"format_version": CACHE_FORMAT_VERSION, "key": asdict(self.key), "layout": layout}
            atomic_write_text(tmp / "cache.json", json.dumps(meta, indent=2) + "\n")
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                os.replace(path, old / "cache")
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expect: CacheKey) -> FeatureCache:
        """Open a saved cache, refusing it (with the reasons) unless it was made exactly as ``expect`` says."""
        path = Path(path)
        meta_path = path / "cache.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path} is not a complete feature cache (no cache.json); extract it again")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != CACHE_FORMAT_VERSION:
            raise ValueError(f"{path}: cache format {meta.get('format_version')!r} is not {CACHE_FORMAT_VERSION}")
        raw = meta["key"]
        saved = CacheKey(**{**raw, "keys": tuple(raw["keys"]), "versions": tuple(map(tuple, raw["versions"]))})
        problems = saved.mismatches(expect)
        if problems:
            raise ValueError(
                f"feature cache {path} does not match this run; extract it again. Differences: " + "; ".join(problems)
            )
        dtype = _DTYPES[saved.dtype]
        features = {}
        for key, shape in meta["layout"].items():
            count = int(torch.Size(shape).numel())
            flat = torch.from_file(str(path / f"x{key}.bin"), shared=False, size=count, dtype=dtype)
            features[int(key)] = flat.view(shape)
        labels = torch.from_file(str(path / "labels.bin"), shared=False, size=saved.count, dtype=torch.int64)
        return cls(features, labels, saved)


def extract(
    bypass: Bypass,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    items: Sequence[str],
    transform: Any = None,
    dtype: torch.dtype = torch.float32,
    path: str | os.PathLike | None = None,
    progress: bool = True,
) -> FeatureCache:
    """Run the frozen backbone once over an ordered dataset and keep what ``bypass`` reads.

    Args:
        bypass: decides which features (blocks, class token only or all tokens) are kept.
        batches: (images, labels) batches in the order of ``items``, e.g. a non-shuffling DataLoader.
        items: the ordered identifiers of the images (e.g. their paths), recorded and checked on reuse.
        transform: the input transform (checked to be deterministic) or a description string.
        dtype: storage dtype: float32, float16 or bfloat16.
        path: also write the cache there (atomically).
        progress: show a progress bar.
    """
    if transform is not None and not isinstance(transform, str):
        check_deterministic(transform)
    if str(dtype).removeprefix("torch.") not in _DTYPES:
        raise ValueError(f"cache dtype must be one of {', '.join(_DTYPES)}, got {dtype}")
    key = CacheKey.expected(bypass, items, transform, dtype)
    parts: dict[int, list[torch.Tensor]] = {k: [] for k in bypass.keys}
    labels = []
    for images, targets in tqdm(batches, desc="extracting features", unit="batch", disable=not progress):
        for k, v in bypass.features(images).items():
            parts[k].append(v.to(dtype).cpu())
        labels.append(targets.cpu())
    cache = FeatureCache({k: torch.cat(v) for k, v in parts.items()}, torch.cat(labels).to(torch.int64), key)
    if len(cache) != len(items):
        raise ValueError(f"{len(cache)} images were extracted but {len(items)} items were named; they must match")
    if path is not None:
        cache.save(path)
    return cache


def train_from_cache(
    bypass: Bypass,
    cache: FeatureCache,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train a Bypass's tuners and head from a cache with AdamW; shuffling derives from (seed, epoch)."""
    parameters = bypass.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    device = parameters[0].device
    bypass.train()
    losses = []
    for epoch in tqdm(range(epochs), desc="epochs", disable=not progress):
        order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for start in range(0, len(cache), batch_size):
            features, labels = cache.batch(order[start : start + batch_size])
            features = {k: v.to(device) for k, v in features.items()}
            loss = F.cross_entropy(bypass.logits_from_features(features), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses
