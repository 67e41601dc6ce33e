"""Feature caches: equality with live training, every refusal of a stale cache, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from conftest import make_images, make_vit, randomize_

import restune
from restune import Bypass, BypassConfig
from restune import features as features_module
from restune.features import CacheKey, FeatureCache, extract, train_from_cache

ITEMS = [f"images/{i:03d}.jpg" for i in range(6)]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    return make_images(batch=6), torch.tensor([0, 1, 2, 3, 4, 0])


def _bypass(backbone: torch.nn.Module | None = None, spec: BypassConfig | None = None) -> Bypass:
    bypass = Bypass(backbone or make_vit(0), spec or BypassConfig(), num_classes=5)
    randomize_([(n, p) for n, p in bypass.named_parameters() if not n.startswith("backbone.")], 3, std=0.2)
    return bypass


def _batches(images: torch.Tensor, labels: torch.Tensor, size: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(images.split(size), labels.split(size), strict=True))


@pytest.mark.parametrize("spec", [BypassConfig(), BypassConfig(lateral={"type": "res_attn", "r": 4, "heads": 2})])
def test_fp32_cache_gives_the_gradients_of_live_training(spec: BypassConfig) -> None:
    images, labels = _data()
    bypass = _bypass(spec=spec)
    cache = extract(bypass, _batches(images, labels), items=ITEMS, transform="identity", progress=False)
    index = torch.arange(3)  # the first extraction batch: the backbone saw exactly these images together
    features, cached_labels = cache.batch(index)
    assert torch.equal(cached_labels, labels[index])
    cached = torch.autograd.grad(
        F.cross_entropy(bypass.logits_from_features(features), cached_labels), bypass.trainable_parameters()
    )
    live = torch.autograd.grad(F.cross_entropy(bypass(images[index]), labels[index]), bypass.trainable_parameters())
    for a, b in zip(cached, live, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_pruned_cache_keeps_the_class_token_only() -> None:
    images, labels = _data()
    bypass = _bypass()
    cache = extract(bypass, _batches(images, labels), items=ITEMS, progress=False)
    assert sorted(cache.features) == [0, 1, 2]
    assert all(f.shape == (6, 1, 32) for f in cache.features.values())  # (L + 1) x D values per image


def test_saved_cache_round_trips_and_trains(tmp_path: Path) -> None:
    images, labels = _data()
    bypass = _bypass()
    memory = extract(
        bypass, _batches(images, labels), items=ITEMS, transform="resize", path=tmp_path / "c", progress=False
    )
    expected = CacheKey.expected(bypass, ITEMS, "resize", torch.float32)
    disk = FeatureCache.load(tmp_path / "c", expected)
    for key, value in memory.features.items():
        assert torch.equal(disk.features[key], value)
    assert torch.equal(disk.labels, labels)
    losses = train_from_cache(bypass, disk, epochs=15, batch_size=3, lr=1e-2, progress=False)
    assert losses[-1] < losses[0]


def test_half_precision_caches(tmp_path: Path) -> None:
    images, labels = _data()
    bypass = _bypass()
    full = extract(bypass, _batches(images, labels), items=ITEMS, progress=False)
    for dtype in (torch.float16, torch.bfloat16):
        half = extract(
            bypass, _batches(images, labels), items=ITEMS, dtype=dtype, path=tmp_path / str(dtype), progress=False
        )
        loaded = FeatureCache.load(tmp_path / str(dtype), CacheKey.expected(bypass, ITEMS, None, dtype))
        assert loaded.features[1].dtype == dtype
        features, _ = loaded.batch(torch.arange(6))
        torch.testing.assert_close(features[2], full.features[2], atol=0.05, rtol=0.02)
        assert half.key.dtype == str(dtype).removeprefix("torch.")


def test_every_stale_cache_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _data()
    bypass = _bypass()
    extract(bypass, _batches(images, labels), items=ITEMS, transform="resize", path=tmp_path / "c", progress=False)
    good = CacheKey.expected(bypass, ITEMS, "resize", torch.float32)
    FeatureCache.load(tmp_path / "c", good)
    stale = {
        "backbone weights": CacheKey.expected(_bypass(make_vit(1)), ITEMS, "resize", torch.float32),
        "transform": CacheKey.expected(bypass, ITEMS, "resize+flip", torch.float32),
        "dtype": CacheKey.expected(bypass, ITEMS, "resize", torch.bfloat16),
        "ordered item list": CacheKey.expected(bypass, ITEMS[::-1], "resize", torch.float32),
        "feature layout": CacheKey.expected(_bypass(spec=BypassConfig(blocks=[1])), ITEMS, "resize", torch.float32),
        "class_token_only": CacheKey.expected(
            _bypass(spec=BypassConfig(prune_tokens=False)), ITEMS, "resize", torch.float32
        ),
    }
    for reason, key in stale.items():
        with pytest.raises(ValueError, match=reason):
            FeatureCache.load(tmp_path / "c", key)
    monkeypatch.setattr(restune.features, "__version__", "99.0")
    with pytest.raises(ValueError, match="versions"):
        FeatureCache.load(tmp_path / "c", CacheKey.expected(bypass, ITEMS, "resize", torch.float32))


def test_random_augmentation_cannot_be_cached() -> None:
    images, labels = _data()
    pipeline = T.Compose([T.Resize(32), T.RandomHorizontalFlip(), T.ToTensor()])
    with pytest.raises(ValueError, match="RandomHorizontalFlip"):
        extract(_bypass(), _batches(images, labels), items=ITEMS, transform=pipeline, progress=False)
    extract(_bypass(), _batches(images, labels), items=ITEMS, transform=T.Compose([T.Resize(32)]), progress=False)


def test_a_half_written_cache_is_never_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _data()
    bypass = _bypass()
    calls = {"n": 0}
    original = features_module._write_array

    def crash_on_second_file(tensor: torch.Tensor, path: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        original(tensor, path)

    monkeypatch.setattr(features_module, "_write_array", crash_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        extract(bypass, _batches(images, labels), items=ITEMS, path=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "partial").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete feature cache"):
        FeatureCache.load(tmp_path / "partial", CacheKey.expected(bypass, ITEMS, None, torch.float32))


def test_item_count_must_match() -> None:
    images, labels = _data()
    with pytest.raises(ValueError, match="items were named"):
        extract(_bypass(), _batches(images, labels), items=ITEMS[:4], progress=False)
