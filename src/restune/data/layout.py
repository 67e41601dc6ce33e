"""Pick the reader for a dataset folder, so the harness takes one ``--data-dir`` for VTAB-1k and FGVC alike."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from restune.data.base import DatasetError, ImageListDataset
from restune.data.imagefolder import ImageFolderSplits
from restune.data.vtab import VTAB_SPLITS, VtabFolder

__all__ = ["detect_layout", "open_dataset"]


def _listing(folder: Path, limit: int = 10) -> str:
    names = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in os.scandir(folder))
    if not names:
        return "nothing (the folder is empty)"
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def detect_layout(data_dir: str | os.PathLike[str], dataset: str, split: str | None = None) -> str:
    """``"vtab"`` if the task folder has VTAB lists, ``"imagefolder"`` if it has ``train/``, else raise.

    VTAB lists win when both exist, because the lists are authoritative wherever they are present.

    Raises:
        FileNotFoundError: the data directory or the task folder does not exist.
        DatasetError: the task folder matches neither layout; the message says what was found.
    """
    data_dir = Path(data_dir)
    task_dir = data_dir / dataset
    if not task_dir.is_dir():
        where = _listing(data_dir) if data_dir.is_dir() else f"{data_dir} does not exist either"
        raise FileNotFoundError(
            f"dataset folder {task_dir} does not exist; {data_dir} holds: {where}. Check the data directory and the "
            "dataset name"
        )
    names = [*VTAB_SPLITS, *([split] if split and split not in VTAB_SPLITS else [])]
    if any((task_dir / f"{name}.txt").is_file() for name in names):
        return "vtab"
    if (task_dir / "train").is_dir():
        return "imagefolder"
    raise DatasetError(
        f"{task_dir} is neither a VTAB-1k task (looked for the lists {', '.join(n + '.txt' for n in names)}) nor an "
        f"ImageFolder task (looked for train/<class>/ folders); it holds: {_listing(task_dir)}. Arrange it in one of "
        "these layouts"
    )


def open_dataset(
    data_dir: str | os.PathLike[str],
    dataset: str,
    split: str,
    transform: Callable[[Image.Image], Any] | None = None,
    *,
    num_classes: int | None = None,
) -> ImageListDataset:
    """Open one split of ``<data_dir>/<dataset>`` in whichever layout it has (see ``detect_layout``).

    Args:
        data_dir: the folder holding the dataset folders.
        dataset: the dataset (task) folder name.
        split: ``train800``, ``val200``, ``train800val200`` or ``test`` for both layouts (ImageFolder maps them onto
            ``train``/``val``/``train``+``val``/``test``, see ``restune.data.imagefolder``).
        transform: applied to each RGB PIL image, e.g. ``build_transform(model)``.
        num_classes: VTAB layout only: the class count to check the labels against (inferred when unset). For an
            ImageFolder task it must equal the number of class folders if given.

    Returns:
        A ``VtabFolder`` or ``ImageFolderSplits``; both have ``num_classes``, ``samples``, ``targets`` and ``items``.
    """
    if detect_layout(data_dir, dataset, split) == "vtab":
        return VtabFolder(data_dir, dataset, split, transform, num_classes=num_classes)
    opened = ImageFolderSplits(data_dir, dataset, split, transform)
    if num_classes is not None and num_classes != opened.num_classes:
        raise DatasetError(
            f"{Path(data_dir) / dataset / 'train'} has {opened.num_classes} class folders but num_classes={num_classes}"
            " was asked for; fix the folders or the class count"
        )
    return opened
