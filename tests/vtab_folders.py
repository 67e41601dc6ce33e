"""Tiny on-disk datasets in the VTAB-1k list format and as ImageFolder trees, for data and training-loop tests.

Import with ``from vtab_folders import make_vtab_task, make_imagefolder_task`` (pytest puts ``tests/`` on
``sys.path`` because it has no ``__init__.py``, as for ``from conftest import make_vit``).

Every image is a flat class colour (hues spread evenly around the colour wheel) plus seeded noise and a seeded
brightness offset, so a class is learnable from the mean colour alone, even by a tiny model in a few steps, and
the files are identical for identical arguments.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

VTAB_SIZES = ("train800", "val200", "test")
FOLDER_SIZES = ("train", "val", "test")


def class_colour(label: int, num_classes: int) -> np.ndarray:
    """The RGB base colour (0-255 floats) of a class: evenly spaced hues, saturation 0.8, value 0.8."""
    red, green, blue = colorsys.hsv_to_rgb(label / num_classes, 0.8, 0.8)
    return np.array([red, green, blue]) * 255.0


def _image(rng: np.random.Generator, label: int, num_classes: int, size: int) -> Image.Image:
    base = class_colour(label, num_classes) + rng.uniform(-12.0, 12.0)
    pixels = base + rng.normal(0.0, 10.0, size=(size, size, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _labels(rng: np.random.Generator, count: int, num_classes: int) -> list[int]:
    """Every class equally often (round robin), in a seeded order."""
    return [int(v) for v in rng.permutation(np.arange(count) % num_classes)]


def _check(num_classes: int, sizes: dict[str, int], allowed: tuple[str, ...], image_format: str) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    unknown = sorted(set(sizes) - set(allowed))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown} in sizes; expected keys among {allowed}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")


def make_vtab_task(
    root: str | Path,
    task: str,
    num_classes: int = 3,
    sizes: dict[str, int] | None = None,
    image_size: int = 16,
    seed: int = 0,
    image_format: str = "png",
) -> Path:
    """Write ``<root>/<task>/`` in the VTAB-1k format and return that folder.

    Images go to ``images/<split>/<index>.<ext>``; ``train800.txt``, ``val200.txt`` and ``test.txt`` list them and
    ``train800val200.txt`` is the train800 lines followed by the val200 lines (same files, as in the archive's
    union). ``sizes`` overrides the image count of some splits (defaults: 4 per class in train800, 2 per class in
    val200 and test); a split of size 0 gets neither images nor a list (nor does train800val200 without both parts).
    Labels cycle through all classes, so the inferred class count is ``num_classes`` whenever some split has at
    least ``num_classes`` images.
    """
    sizes = {"train800": 4 * num_classes, "val200": 2 * num_classes, "test": 2 * num_classes, **(sizes or {})}
    _check(num_classes, sizes, VTAB_SIZES, image_format)
    rng = np.random.default_rng(seed)
    task_dir = Path(root) / task
    lines: dict[str, list[str]] = {}
    for split in VTAB_SIZES:
        count = sizes.get(split, 0)
        if count <= 0:
            continue
        (task_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        lines[split] = []
        for index, label in enumerate(_labels(rng, count, num_classes)):
            relative = f"images/{split}/{index:05d}.{image_format}"
            _image(rng, label, num_classes, image_size).save(task_dir / relative)
            lines[split].append(f"{relative} {label}\n")
    if "train800" in lines and "val200" in lines:
        lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, split_lines in lines.items():
        (task_dir / f"{split}.txt").write_text("".join(split_lines))
    return task_dir


def make_imagefolder_task(
    root: str | Path,
    task: str,
    num_classes: int = 3,
    sizes: dict[str, int] | None = None,
    image_size: int = 16,
    seed: int = 0,
    image_format: str = "png",
) -> Path:
    """Write ``<root>/<task>/{train,val,test}/class_<k>/<index>.<ext>`` and return the task folder.

    ``sizes`` overrides the image count of some split folders (defaults: 4 per class in train, 2 per class in val and
    test); a split of size 0 is not created (to test a task without ``val/``). Class folder names are zero-padded so
    their sorted order is the label order, and every class folder is created in every split even when it gets no
    image.
    """
    sizes = {"train": 4 * num_classes, "val": 2 * num_classes, "test": 2 * num_classes, **(sizes or {})}
    _check(num_classes, sizes, FOLDER_SIZES, image_format)
    rng = np.random.default_rng(seed)
    task_dir = Path(root) / task
    width = len(str(num_classes - 1))
    for split in FOLDER_SIZES:
        count = sizes.get(split, 0)
        if count <= 0:
            continue
        for label in range(num_classes):
            (task_dir / split / f"class_{label:0{width}d}").mkdir(parents=True, exist_ok=True)
        for index, label in enumerate(_labels(rng, count, num_classes)):
            path = task_dir / split / f"class_{label:0{width}d}" / f"{index:05d}.{image_format}"
            _image(rng, label, num_classes, image_size).save(path)
    return task_dir
