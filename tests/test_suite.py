"""The offline VTAB-style suite: folder format, determinism, manifest skip/rewrite, real digits, learnability."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from restune import suite
from restune.suite import writer
from restune.suite.tasks import DISTANCE_EDGES, digit_data

SMALL_TEST = 40
RIDGE = 100.0
TINY = {"train800": 20, "val200": 10, "test": 10}  # >= 2 images per class in train800 for every task


def _tiny_sizes(test_size: int) -> dict[str, int]:
    return {**TINY, "test": test_size}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every task, written once for the module with the fixed split sizes shrunk (the format does not change)."""
    root = tmp_path_factory.mktemp("suite")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writer, "split_sizes", _tiny_sizes)
        suite.write_suite(root, seed=0, test_size=TINY["test"], progress=False, workers=1)
    return root


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One task at the real VTAB-1k sizes (800 / 200 / 1000 lines) and a short test split."""
    root = tmp_path_factory.mktemp("full")
    suite.write_suite(root, ["textures"], seed=0, test_size=SMALL_TEST, progress=False)
    return root


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the fixed split sizes so manifest tests write a few dozen images, not a thousand."""
    monkeypatch.setattr(writer, "split_sizes", _tiny_sizes)


# --- registry ------------------------------------------------------------------------------------------------------


def test_registry_covers_the_three_vtab_groups() -> None:
    assert len(suite.TASKS) >= 6
    assert set(suite.SUITE_GROUPS.values()) == {"natural", "specialized", "structured"}
    assert {name: task.group for name, task in suite.TASKS.items()} == suite.SUITE_GROUPS
    for task in suite.TASKS.values():
        group, num_classes, generator = task[:3]
        assert group in ("natural", "specialized", "structured")
        assert num_classes >= 2 and callable(generator)


@pytest.mark.parametrize("name", list(suite.TASKS))
def test_generators_draw_uint8_rgb_from_the_rng(name: str) -> None:
    task = suite.TASKS[name]
    for label in range(task.num_classes):
        image = task.generator(np.random.default_rng(label), label)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        again = task.generator(np.random.default_rng(label), label)
        np.testing.assert_array_equal(image, again)
        assert image.std() > 5  # not a flat fill
    assert task.generator(np.random.default_rng(0), 0, 48).shape == (48, 48, 3)


def test_balanced_labels_cover_every_class() -> None:
    labels = suite.balanced_labels(np.random.default_rng(0), 800, 6)
    assert np.bincount(labels).tolist() == [134] * 2 + [133] * 4


# --- format --------------------------------------------------------------------------------------------------------


def _check_format(root: Path, name: str, sizes: dict[str, int]) -> None:
    folder = root / name
    assert sorted(p.name for p in folder.glob("*.txt")) == sorted(f"{s}.txt" for s in suite.LIST_SPLITS)
    splits = {split: suite.read_split(root, name, split) for split in suite.LIST_SPLITS}
    expected = {**sizes, "train800val200": sizes["train800"] + sizes["val200"]}
    assert {split: len(pairs) for split, pairs in splits.items()} == expected
    raw = {split: (folder / f"{split}.txt").read_text().splitlines() for split in suite.LIST_SPLITS}
    assert raw["train800val200"] == raw["train800"] + raw["val200"]
    for line in raw["test"] + raw["train800val200"]:
        path, label = line.split(" ")
        assert not Path(path).is_absolute() and path.endswith(".png") and "/" in path
        assert 0 <= int(label) < suite.TASKS[name].num_classes
    listed = {path for pairs in splits.values() for path, _ in pairs}
    assert all(path.is_file() for path in listed)
    assert listed == set(folder.glob("images/*/*.png"))  # no stray, unlisted images
    train_labels = [label for _, label in splits["train800"]]
    assert set(train_labels) == set(range(suite.TASKS[name].num_classes))
    with Image.open(splits["test"][0][0]) as image:
        assert image.mode == "RGB" and image.size == (32, 32)


@pytest.mark.parametrize("name", list(suite.TASKS))
def test_folder_format(written: Path, name: str) -> None:
    _check_format(written, name, TINY)


def test_folder_format_at_vtab_sizes(full: Path) -> None:
    _check_format(full, "textures", {"train800": 800, "val200": 200, "test": SMALL_TEST})
    labels = [label for _, label in suite.read_split(full, "textures", "train800")]
    assert np.bincount(labels).tolist() == [100] * 8
    assert suite.is_complete(full, "textures", 0, SMALL_TEST)


def test_png_files_decode_to_the_generated_pixels(written: Path) -> None:
    image = np.asarray(Image.open(written / "cells" / "images" / "val200" / "00003.png"))
    label = suite.read_split(written, "cells", "val200")[3][1]
    expected = suite.TASKS["cells"].generator(suite.image_rng(0, "cells", "val200", 3), label)
    np.testing.assert_array_equal(image, expected)


def test_manifest_records_each_task(written: Path) -> None:
    manifest = suite.read_manifest(written)
    assert set(manifest["tasks"]) == set(suite.TASKS)
    entry = manifest["tasks"]["count"]
    assert entry["seed"] == 0 and entry["test_size"] == TINY["test"] and entry["image_size"] == 32
    assert entry["num_classes"] == suite.TASKS["count"].num_classes and entry["images"] == sum(TINY.values())
    assert not list(written.glob(".*"))  # no temporary folders or files left behind


# --- determinism ---------------------------------------------------------------------------------------------------


def _same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return False
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(p) for p in files_a], shallow=False)
    return not mismatch and not errors and len(match) == len(files_a)


def test_same_seed_gives_identical_bytes_in_any_number_of_processes(written: Path, tmp_path: Path, tiny: None) -> None:
    suite.write_task(tmp_path, "location", seed=0, test_size=TINY["test"], workers=2)
    assert _same_tree(written / "location", tmp_path / "location")


def test_different_seed_gives_different_images(tiny: None, tmp_path: Path) -> None:
    for seed in (0, 1):
        suite.write_task(tmp_path / str(seed), "orientation", seed=seed, test_size=4)
    a, b = (tmp_path / str(seed) / "orientation" / "images" / "train800" / "00000.png" for seed in (0, 1))
    assert a.read_bytes() != b.read_bytes()
    assert not _same_tree(tmp_path / "0" / "orientation", tmp_path / "1" / "orientation")


def test_image_streams_do_not_depend_on_order() -> None:
    first = suite.image_rng(3, "count", "test", 7).random(4)
    suite.image_rng(3, "count", "test", 6).random(100)
    np.testing.assert_array_equal(first, suite.image_rng(3, "count", "test", 7).random(4))
    assert not np.array_equal(first, suite.image_rng(3, "count", "val200", 7).random(4))
    assert not np.array_equal(first, suite.image_rng(3, "location", "test", 7).random(4))


# --- manifest: skip, rewrite, interrupted writes -------------------------------------------------------------------


def _writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = writer.write_task

    def counting(root: Path, name: str, *args: object, **kwargs: object) -> Path:
        calls.append(name)
        return real(root, name, *args, **kwargs)

    monkeypatch.setattr(writer, "write_task", counting)
    return calls


def test_complete_tasks_are_skipped_and_changed_ones_rewritten(
    tiny: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _writes(monkeypatch)
    tasks = ["textures", "count"]
    paths = suite.write_suite(tmp_path, tasks, seed=0, test_size=5, progress=False, workers=1)
    assert paths == {name: tmp_path / name for name in tasks} and calls == tasks
    before = (tmp_path / "count" / "images" / "test" / "00000.png").read_bytes()

    suite.write_suite(tmp_path, tasks, seed=0, test_size=5, progress=False, workers=1)
    assert calls == tasks  # nothing rewritten

    suite.write_suite(tmp_path, ["count"], seed=1, test_size=5, progress=False, workers=1)
    assert calls[2:] == ["count"]
    assert (tmp_path / "count" / "images" / "test" / "00000.png").read_bytes() != before
    assert suite.read_manifest(tmp_path)["tasks"]["count"]["seed"] == 1
    assert suite.is_complete(tmp_path, "textures", 0, 5)  # the other task's entry survives

    for changed in ({"test_size": 6}, {"image_size": 24}):
        suite.write_suite(tmp_path, ["count"], **{"seed": 1, "test_size": 5, **changed}, progress=False, workers=1)
        assert calls[-1] == "count" and len(calls) == 4 + (changed == {"image_size": 24})
    with Image.open(tmp_path / "count" / "images" / "val200" / "00000.png") as image:
        assert image.size == (24, 24)


@pytest.mark.parametrize("damage", ["missing image", "short list", "no manifest entry", "half renamed"])
def test_interrupted_or_damaged_tasks_are_detected_and_rewritten(
    tiny: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    suite.write_suite(tmp_path, ["distance"], seed=0, test_size=5, progress=False, workers=1)
    folder = tmp_path / "distance"
    if damage == "missing image":
        (folder / "images" / "val200" / "00003.png").unlink()
    elif damage == "short list":
        lines = (folder / "test.txt").read_text().splitlines()
        (folder / "test.txt").write_text("\n".join(lines[:-1]) + "\n")
    elif damage == "no manifest entry":
        (tmp_path / suite.MANIFEST).unlink()
    else:  # killed between moving the old folder aside and moving the new one in
        folder.rename(tmp_path / ".distance.old")
        (tmp_path / ".distance.partial" / "images").mkdir(parents=True)
    assert not suite.is_complete(tmp_path, "distance", 0, 5)
    calls = _writes(monkeypatch)
    suite.write_suite(tmp_path, ["distance"], seed=0, test_size=5, progress=False, workers=1)
    assert calls == ["distance"] and suite.is_complete(tmp_path, "distance", 0, 5)
    assert sorted(os.listdir(tmp_path)) == ["distance", suite.MANIFEST]


def test_bad_requests_fail_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown task"):
        suite.write_suite(tmp_path, ["count", "fractals"], progress=False)
    with pytest.raises(ValueError, match="test_size"):
        suite.write_task(tmp_path, "count", test_size=0)
    with pytest.raises(ValueError, match="seed"):
        suite.write_suite(tmp_path, ["count"], seed=-1, progress=False)
    assert not list(tmp_path.iterdir())


def test_a_new_suite_version_invalidates_old_tasks(tiny: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    suite.write_task(tmp_path, "location", test_size=3)
    assert suite.is_complete(tmp_path, "location", 0, 3)
    monkeypatch.setattr(writer, "FORMAT_VERSION", writer.FORMAT_VERSION + 1)
    assert not suite.is_complete(tmp_path, "location", 0, 3)


# --- digits are real scikit-learn scans ----------------------------------------------------------------------------


def test_digits_are_sklearn_scans_with_disjoint_splits() -> None:
    from sklearn.datasets import load_digits

    images, targets = digit_data()
    reference = load_digits()
    np.testing.assert_array_equal(targets, reference.target)
    np.testing.assert_allclose(images * 16, reference.images)

    planned = writer.plan("digits", 0, 500)  # the default sizes: 1,500 of the 1,797 scans
    labels = {split: lab for split, (lab, _) in planned.items()}
    sources = {split: src for split, (_, src) in planned.items()}
    for split, lab in labels.items():
        np.testing.assert_array_equal(targets[sources[split]], lab)  # each image shows a scan of its own label
        assert len(set(sources[split])) == len(lab)  # no scan repeated within a split at default sizes
    assert np.bincount(labels["train800"]).tolist() == [80] * 10
    assert not set(sources["train800"]) & set(sources["val200"])
    assert not (set(sources["train800"]) | set(sources["val200"])) & set(sources["test"])


def test_digit_images_show_the_scan() -> None:
    """The drawn glyph, rendered without jitter-sensitive comparisons: its foreground area tracks the scan's ink."""
    images, targets = digit_data()
    heavy, light = int(np.argmax(images.sum((1, 2)))), int(np.argmin(images.sum((1, 2))))
    areas = {}
    for index in (heavy, light):
        inked = []
        for k in range(20):
            image = suite.TASKS["digits"].generator(np.random.default_rng(k), int(targets[index]), 32, source=index)
            grey = image.astype(np.float32).mean(-1)
            border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
            inked.append((np.abs(grey - np.median(border)) > 40).mean())
        areas[index] = float(np.median(inked))
    assert 0.03 < areas[light] < areas[heavy] < 0.6


# --- learnability --------------------------------------------------------------------------------------------------


def _random_features(images: np.ndarray) -> np.ndarray:
    """A fixed random network: per-image centring, 32 random 5x5 filters, ReLU, 4x4 average and 2x2 max pooling.

    Raw-pixel linear probes are blind by design here (random colours, polarity, phase and position), so the
    sanity probe is the cheapest 'random network' that tolerates them: learnable means this probe beats chance.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 3, 5, 5, generator=generator) / 8.0
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        h = torch.relu(torch.nn.functional.conv2d(x - x.mean((2, 3), keepdim=True), weight, padding=2))
        pooled = [torch.nn.functional.adaptive_avg_pool2d(h, 4), torch.nn.functional.adaptive_max_pool2d(h, 2)]
        return torch.cat([p.flatten(1) for p in pooled], 1).numpy()


def _ridge_accuracy(train: np.ndarray, y: np.ndarray, test: np.ndarray, yt: np.ndarray, k: int) -> float:
    mean, std = train.mean(0), train.std(0) + 1e-6
    a, b = (train - mean) / std, (test - mean) / std
    targets = np.eye(k)[y] - 1.0 / k
    dual = np.linalg.solve(a @ a.T + RIDGE * np.eye(len(a)), targets)
    return float(((b @ (a.T @ dual)).argmax(1) == yt).mean())


def _sample(name: str, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    task = suite.TASKS[name]
    labels = suite.balanced_labels(np.random.default_rng(len(split)), n, task.num_classes)
    images = np.stack([task.generator(suite.image_rng(0, name, split, i), int(lab)) for i, lab in enumerate(labels)])
    return images, labels


@pytest.mark.parametrize("name", list(suite.TASKS))
def test_tasks_are_learnable_but_not_saturated(name: str) -> None:
    k = suite.TASKS[name].num_classes
    train, y = _sample(name, "train800", 320)
    test, yt = _sample(name, "test", 160)
    accuracy = _ridge_accuracy(_random_features(train), y, _random_features(test), yt, k)
    chance = 1.0 / k
    margin = 3.0 * np.sqrt(chance * (1 - chance) / len(yt))  # three binomial standard deviations above chance
    assert accuracy > chance + margin, f"{name}: {accuracy:.3f} vs chance {chance:.3f}"
    assert accuracy < 0.95, f"{name}: {accuracy:.3f} is saturated for a random-feature probe"
    if suite.SUITE_GROUPS[name] == "structured":
        assert accuracy < 0.9


def test_distance_bins_cover_one_to_six() -> None:
    assert DISTANCE_EDGES[0] == 1.0 and DISTANCE_EDGES[-1] == pytest.approx(6.0)
