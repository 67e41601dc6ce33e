"""FGVC and other data as ImageFolder trees, addressed with the VTAB split names (docs/methods/README.md).

    <root>/<task>/train/<class>/<image>
    <root>/<task>/val/<class>/<image>       (optional)
    <root>/<task>/test/<class>/<image>

The harness asks every dataset for ``train800``, ``val200``, ``train800val200`` and ``test`` (its protocols are
written in VTAB's terms), so those names map onto the folders: ``train800`` -> ``train``, ``val200`` -> ``val``,
``train800val200`` -> ``train`` followed by ``val``, ``test`` -> ``test``. The folder names themselves (``train``,
``val``, ``test``, and ``trainval`` or ``train+val`` for the union) are accepted too. No size is implied: FGVC's
``train800`` is its whole VPT train split.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from restune.data.base import IMAGE_EXTENSIONS, DatasetError, ImageListDataset

__all__ = ["SPLIT_FOLDERS", "ImageFolderSplits"]

#: Split name -> the split folders it reads, in order.
SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "train800": ("train",),
    "val200": ("val",),
    "train800val200": ("train", "val"),
    "test": ("test",),
    "train": ("train",),
    "val": ("val",),
    "trainval": ("train", "val"),
    "train+val": ("train", "val"),
}


def _visible_dirs(folder: Path) -> list[str]:
    """Sorted sub-folder names, skipping hidden ones (``.ipynb_checkpoints`` and the like are not classes)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))


def _images_below(folder: Path) -> list[str]:
    """Image files anywhere below ``folder`` as sorted relative POSIX paths (the order must not depend on the OS)."""
    found = []
    for current, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        relative = Path(current).relative_to(folder)
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((relative / name).as_posix())
    return found


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class ImageFolderSplits(ImageListDataset):
    """One split of a task stored as ImageFolder trees, with labels from the sorted class folders of ``train/``.

    The class list always comes from ``train/`` (so every split of a task shares one label mapping) and ``val/`` and
    ``test/``, where present, must hold exactly the same class folders: a missing or extra class would silently shift
    labels otherwise. Within a class, images (files ending in ``IMAGE_EXTENSIONS``, in sub-folders too) are sorted.

    Args:
        root: the folder holding the task folders.
        task: the task folder name, e.g. ``"cub"``.
        split: a key of ``SPLIT_FOLDERS``: ``train800``/``train``, ``val200``/``val``,
            ``train800val200``/``trainval``/``train+val`` or ``test``.
        transform: applied to each RGB PIL image (see ``build_transform``); ``None`` returns the image.

    Attributes:
        classes: the class folder names; label ``i`` is ``classes[i]``.
        class_to_idx: the inverse mapping.

    Raises:
        FileNotFoundError: the task folder, its ``train/`` folder or a folder the split needs is missing.
        DatasetError: the class sets differ between split folders, ``train/`` has no classes or an empty class,
            or the split has no images.
        ValueError: the split name is unknown.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        task: str,
        split: str,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        if split not in SPLIT_FOLDERS:
            raise ValueError(f"unknown split {split!r}; ImageFolder tasks accept {', '.join(SPLIT_FOLDERS)}")
        self.root = Path(root)
        self.task = task
        self.split = split
        task_dir = self.root / task
        if not task_dir.is_dir():
            raise FileNotFoundError(f"task folder {task_dir} does not exist; check the data directory and task name")
        train_dir = task_dir / "train"
        if not train_dir.is_dir():
            raise FileNotFoundError(
                f"{train_dir} does not exist; an ImageFolder task needs train/<class>/ folders (its class list "
                f"comes from there). Found in {task_dir}: {_names(_visible_dirs(task_dir)) or 'no folders'}"
            )
        self.classes = _visible_dirs(train_dir)
        if not self.classes:
            raise DatasetError(f"{train_dir} has no class folders; put each class's images in train/<class>/")
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        for other in ("val", "test"):
            if (task_dir / other).is_dir():
                self._check_same_classes(task_dir / other)
        samples: list[tuple[str, int]] = []
        items: list[str] = []
        for folder_name in SPLIT_FOLDERS[split]:
            folder = task_dir / folder_name
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"split {split!r} of task {task!r} needs {folder}, which does not exist (split folders present: "
                    f"{_names([n for n in ('train', 'val', 'test') if (task_dir / n).is_dir()])}); create it or ask "
                    "for a split whose folders exist"
                )
            for label, name in enumerate(self.classes):
                images = _images_below(folder / name)
                if not images and folder_name == "train":
                    raise DatasetError(
                        f"class folder {folder / name} has no images (endings {', '.join(IMAGE_EXTENSIONS)}); a class "
                        "without training images cannot be learnt: add its images or remove the class from every split"
                    )
                samples.extend((os.path.join(folder, name, image), label) for image in images)
                items.extend(f"{task}/{folder_name}/{name}/{image}" for image in images)
        if not samples:
            raise DatasetError(f"split {split!r} of task {task!r} has no images under {task_dir}")
        super().__init__(samples, items, len(self.classes), transform)

    def _check_same_classes(self, folder: Path) -> None:
        found = _visible_dirs(folder)
        if found == self.classes:
            return
        missing = sorted(set(self.classes) - set(found))
        extra = sorted(set(found) - set(self.classes))
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} class folder(s) of train/: {_names(missing)}")
        if extra:
            problems.append(f"has {len(extra)} class folder(s) not in train/: {_names(extra)}")
        raise DatasetError(
            f"{folder} {'; '.join(problems)}. Labels come from the sorted class folders of train/, so every split must "
            "have the same class folders (an empty folder is fine in val/ and test/); rename or add folders to match"
        )

    def _repr_fields(self) -> dict[str, Any]:
        return {"root": str(self.root), "task": self.task, "split": self.split}
