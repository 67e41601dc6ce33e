"""VTAB-1k in the shared folder-and-list format (docs/methods/README.md).

    <root>/<task>/<split>.txt      one "<relative path> <integer label>" per line, paths relative to <task>/
    <root>/<task>/images/...       the images (anywhere below <task>/; the lists say which belong to a split)

This is the layout of the widely shared JPEG archive used by NOAH, FacT, SSF, RLRR, ARC, SNELL and V-PETL, so the
lists are authoritative: a split is exactly the lines of its list, in order, and a file not listed is never read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from restune.data.base import DatasetError, ImageListDataset

__all__ = ["VTAB_SPLITS", "VTAB_GROUP_NAMES", "VtabTaskInfo", "VTAB_GROUPS", "VtabFolder", "ListEntry", "read_list"]

#: The four splits every VTAB-1k task has: 800 training images, 200 validation images, their union, the full test set.
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")

#: The three VTAB groups, in the order papers print them.
VTAB_GROUP_NAMES = ("Natural", "Specialized", "Structured")


class VtabTaskInfo(NamedTuple):
    """What the papers' tables assume about one VTAB-1k task: its group, class count and test-set size."""

    group: str
    num_classes: int
    test_size: int


#: The 19 VTAB-1k task folders (names of the shared JPEG archive) in table order, with group, classes and test size
#: (docs/methods/README.md). The harness uses the groups for the "mean of group means" convention.
VTAB_GROUPS: dict[str, VtabTaskInfo] = {
    "cifar": VtabTaskInfo("Natural", 100, 10_000),
    "caltech101": VtabTaskInfo("Natural", 102, 6_084),
    "dtd": VtabTaskInfo("Natural", 47, 1_880),
    "oxford_flowers102": VtabTaskInfo("Natural", 102, 6_149),
    "oxford_iiit_pet": VtabTaskInfo("Natural", 37, 3_669),
    "svhn": VtabTaskInfo("Natural", 10, 26_032),
    "sun397": VtabTaskInfo("Natural", 397, 21_750),
    "patch_camelyon": VtabTaskInfo("Specialized", 2, 32_768),
    "eurosat": VtabTaskInfo("Specialized", 10, 5_400),
    "resisc45": VtabTaskInfo("Specialized", 45, 6_300),
    "diabetic_retinopathy": VtabTaskInfo("Specialized", 5, 42_670),
    "clevr_count": VtabTaskInfo("Structured", 8, 15_000),
    "clevr_dist": VtabTaskInfo("Structured", 6, 15_000),
    "dmlab": VtabTaskInfo("Structured", 6, 22_735),
    "kitti": VtabTaskInfo("Structured", 4, 711),
    "dsprites_loc": VtabTaskInfo("Structured", 16, 73_728),
    "dsprites_ori": VtabTaskInfo("Structured", 16, 73_728),
    "smallnorb_azi": VtabTaskInfo("Structured", 18, 12_150),
    "smallnorb_ele": VtabTaskInfo("Structured", 9, 12_150),
}

_LABEL = re.compile(r"-?[0-9]+")
_FORMAT = "a VTAB list has one '<path relative to the task folder> <integer label>' per line"


class ListEntry(NamedTuple):
    """One line of a list file: the image path as written, its label and the 1-based line number."""

    path: str
    label: int
    line: int


def read_list(list_file: str | os.PathLike[str]) -> list[ListEntry]:
    """Parse a VTAB list file, rejecting anything that is not ``<relative path> <integer label>``.

    Blank lines are skipped; the path is everything before the last run of whitespace, so paths may contain spaces.
    Labels are only parsed here (not range-checked), because the class range depends on every list of the task.

    Raises:
        DatasetError: the file is not UTF-8, a line is malformed, a label is not an integer, a path is absolute, or the
            list names no image. The message gives the file and line.
    """
    list_file = Path(list_file)
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{list_file} is not UTF-8 text ({error}); {_FORMAT}") from error
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DatasetError(f"{list_file}, line {number}: expected '<path> <label>', got {raw!r}; {_FORMAT}")
        path, label = parts
        if not _LABEL.fullmatch(label):
            raise DatasetError(
                f"{list_file}, line {number}: label {label!r} is not an integer; labels are class indices 0 ... C-1 "
                f"({_FORMAT})"
            )
        if os.path.isabs(path):
            raise DatasetError(
                f"{list_file}, line {number}: path {path!r} is absolute; write it relative to the task folder "
                f"{list_file.parent} so the dataset can be moved"
            )
        entries.append(ListEntry(path, int(label), number))
    if not entries:
        raise DatasetError(f"{list_file} lists no images; {_FORMAT}. Re-create the list or ask for another split")
    return entries


def _list_names(task_dir: Path) -> str:
    names = sorted(p.name for p in task_dir.glob("*.txt"))
    return ", ".join(names) if names else "none"


class VtabFolder(ImageListDataset):
    """One split of one task in the VTAB-1k folder format: the images named by ``<root>/<task>/<split>.txt``.

    Opening a split reads its list, checks every listed image exists (so a broken archive fails before training, not
    hours in) and fixes the class count; images are decoded when read. The class count is the explicit
    ``num_classes`` or, by default, 1 + the largest label in any of the task's lists present (train800, val200,
    train800val200, test and the requested one), so every split of a task agrees on the head size even when a small
    split misses a class. Pass ``num_classes`` (e.g. ``VTAB_GROUPS[task].num_classes``) to pin it to the papers' count.

    Args:
        root: the folder holding the task folders.
        task: the task folder name, e.g. ``"cifar"`` (any name works; see ``VTAB_GROUPS`` for the 19 standard ones).
        split: ``train800``, ``val200``, ``train800val200`` or ``test``; any other name whose ``.txt`` list exists
            also works.
        transform: applied to each RGB PIL image (see ``build_transform``); ``None`` returns the image.
        num_classes: the task's class count; every label of every list must be below it.

    Raises:
        FileNotFoundError: the task folder, the split's list or a listed image is missing.
        DatasetError: a list line is malformed or a label is outside ``[0, num_classes)``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        task: str,
        split: str,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        num_classes: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.task = task
        self.split = split
        task_dir = self.root / task
        if not task_dir.is_dir():
            raise FileNotFoundError(
                f"VTAB task folder {task_dir} does not exist; check the data directory and the task name"
            )
        self.list_file = task_dir / f"{split}.txt"
        if not self.list_file.is_file():
            raise FileNotFoundError(
                f"no list {self.list_file} for split {split!r} of task {task!r} (lists present: "
                f"{_list_names(task_dir)}); a VTAB-1k task folder has {', '.join(s + '.txt' for s in VTAB_SPLITS)}: "
                "re-extract the task or ask for a split that exists"
            )
        entries = read_list(self.list_file)
        lists = {self.list_file: entries}
        for name in VTAB_SPLITS:
            other = task_dir / f"{name}.txt"
            if other != self.list_file and other.is_file():
                lists[other] = read_list(other)
        self.num_classes = _check_labels(lists, num_classes)
        samples = [(os.path.join(task_dir, entry.path), entry.label) for entry in entries]
        _check_exists(self.list_file, entries, samples)
        self._lines = [entry.line for entry in entries]
        super().__init__(samples, [f"{task}/{entry.path}" for entry in entries], self.num_classes, transform)

    def origin(self, index: int) -> str:
        return f"{self.list_file}, line {self._lines[index]}"

    def _repr_fields(self) -> dict[str, Any]:
        return {"root": str(self.root), "task": self.task, "split": self.split}


def _check_labels(lists: dict[Path, list[ListEntry]], num_classes: int | None) -> int:
    """Fix the class count (explicit, or 1 + the largest label of all lists) and check every label is in range."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
        raise TypeError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    for list_file, entries in lists.items():
        for entry in entries:
            if entry.label < 0:
                raise DatasetError(
                    f"{list_file}, line {entry.line}: label {entry.label} is negative; labels are class indices "
                    "0 ... C-1. Fix the list"
                )
            if num_classes is not None and entry.label >= num_classes:
                raise DatasetError(
                    f"{list_file}, line {entry.line}: label {entry.label} is outside [0, {num_classes}) for "
                    f"num_classes={num_classes}; fix the list or pass the task's true class count (leave num_classes "
                    "unset to infer it from the lists)"
                )
    if num_classes is not None:
        return num_classes
    return 1 + max(entry.label for entries in lists.values() for entry in entries)


def _check_exists(list_file: Path, entries: list[ListEntry], samples: list[tuple[str, int]]) -> None:
    """Fail at open time, naming the first missing image and how many are missing, rather than mid-training."""
    missing = [index for index, (path, _) in enumerate(samples) if not os.path.isfile(path)]
    if missing:
        first, path = entries[missing[0]], samples[missing[0]][0]
        raise FileNotFoundError(
            f"{list_file}, line {first.line}: image {first.path!r} does not exist (looked for {path}); "
            f"{len(missing)} of {len(entries)} listed images are missing. Re-extract the task archive so the images "
            "match the lists, or remove the lines of images you do not have"
        )
