"""Write the suite to disk in the VTAB-1k folder format, deterministically and only when needed.

Layout, per task: ``<root>/<task>/{train800,val200,train800val200,test}.txt`` with lines ``images/<split>/<i>.png
<label>`` relative to the task folder (``train800val200`` lists the train800 lines then the val200 lines, so it
names the same files), and ``<root>/suite.json`` recording how each task was written.

Every image has its own generator seeded from (seed, task, split, index), so output does not depend on which tasks
are written, in what order or in how many processes. A task is built in a hidden sibling folder and renamed into
place before the manifest is updated, so a run killed midway leaves either the old complete task, or a task whose
manifest entry or file counts do not match: both are rewritten by the next :func:`write_suite`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from restune.atomic import atomic_write_text
from restune.suite.tasks import TASKS, Task

MANIFEST = "suite.json"
FORMAT_VERSION = 1  # bump when any generator changes, so suites written by older code are rewritten
IMAGE_SPLITS = ("train800", "val200", "test")
LIST_SPLITS = ("train800", "val200", "train800val200", "test")
_SPLIT_IDS = {split: i for i, split in enumerate(IMAGE_SPLITS)}


def split_sizes(test_size: int) -> dict[str, int]:
    """Images per written split; only ``test`` is configurable, the others are the VTAB-1k sizes."""
    return {"train800": 800, "val200": 200, "test": test_size}


def _entropy(seed: int, name: str, split: str, stream: int, index: int = 0) -> list[int]:
    # fixed length, so no two streams can alias; crc32 keeps the task key stable across Python runs (hash() is salted)
    return [seed, zlib.crc32(name.encode()), _SPLIT_IDS.get(split, len(_SPLIT_IDS)), stream, index]


def image_rng(seed: int, name: str, split: str, index: int) -> np.random.Generator:
    """The generator that draws image ``index`` of ``split``: one per image, independent of all others."""
    return np.random.default_rng(_entropy(seed, name, split, 1, index))


def plan(name: str, seed: int, test_size: int) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Per split, the labels and (for dataset-backed tasks) the source indices, before any image is drawn."""
    task = TASKS[name]
    sizes = split_sizes(test_size)
    labels = {
        split: task.sample_labels(np.random.default_rng(_entropy(seed, name, split, 0)), n, task.num_classes)
        for split, n in sizes.items()
    }
    sources = task.sources(np.random.default_rng(_entropy(seed, name, "sources", 2)), labels) if task.sources else {}
    return {split: (labels[split], sources.get(split)) for split in sizes}


def render(task: Task, rng: np.random.Generator, label: int, size: int, source: int | None) -> np.ndarray:
    """Call the task's generator, passing ``source`` only to dataset-backed tasks (procedural ones take none)."""
    if source is None:
        return task.generator(rng, label, size)
    return task.generator(rng, label, size, source=source)  # type: ignore[call-arg]


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(image: np.ndarray, level: int = 6) -> bytes:
    """An 8-bit RGB PNG of a (H, W, 3) uint8 array, every row with the Sub filter.

    Written directly (signature, IHDR, one IDAT, IEND) because at 32x32 PIL's per-file setup costs more than the
    pixels; there is no timestamp or other metadata, so equal pixels give equal bytes for a given zlib build.
    """
    h, w, channels = image.shape
    rows = image.reshape(h, w * channels)
    left = np.concatenate([np.zeros((h, channels), np.uint8), rows[:, :-channels]], axis=1)
    sub = rows - left  # each byte minus the same channel of the pixel to its left, wrapping mod 256
    filtered = np.concatenate([np.ones((h, 1), np.uint8), sub], axis=1)  # leading byte 1: filter type Sub
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, adaptive filters, no interlace
    idat = zlib.compress(filtered.tobytes(), level)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _write_chunk(args: tuple[str, str, int, int, Path, list[tuple[int, int, int | None]]]) -> int:
    """Render and save a run of images; a top-level function so a process pool can run it."""
    name, split, seed, size, folder, items = args
    task = TASKS[name]
    for index, label, source in items:
        image = render(task, image_rng(seed, name, split, index), label, size, source)
        (folder / f"{index:05d}.png").write_bytes(encode_png(image))
    return len(items)


def _chunks(
    name: str, seed: int, size: int, tmp: Path, planned: dict[str, tuple[np.ndarray, np.ndarray | None]]
) -> Iterable[tuple[str, str, int, int, Path, list[tuple[int, int, int | None]]]]:
    for split, (labels, sources) in planned.items():
        folder = tmp / "images" / split
        folder.mkdir(parents=True)
        items = [(i, int(lab), None if sources is None else int(sources[i])) for i, lab in enumerate(labels)]
        for start in range(0, len(items), 100):
            yield name, split, seed, size, folder, items[start : start + 100]


def _list_lines(planned: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> dict[str, list[str]]:
    lines = {
        split: [f"images/{split}/{i:05d}.png {int(lab)}" for i, lab in enumerate(labels)]
        for split, (labels, _) in planned.items()
    }
    lines["train800val200"] = lines["train800"] + lines["val200"]
    return lines


def _entry(name: str, seed: int, test_size: int, image_size: int) -> dict[str, Any]:
    sizes = split_sizes(test_size)
    task = TASKS[name]
    return {
        "version": FORMAT_VERSION,
        "seed": seed,
        "test_size": test_size,
        "image_size": image_size,
        "group": task.group,
        "num_classes": task.num_classes,
        "lines": {**sizes, "train800val200": sizes["train800"] + sizes["val200"]},
        "images": sum(sizes.values()),
    }


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The suite's ``suite.json`` (an empty manifest when missing or unreadable, which forces a rewrite)."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {"tasks": {}}
    return manifest if isinstance(manifest.get("tasks"), dict) else {"tasks": {}}


def _update_manifest(root: Path, name: str, entry: dict[str, Any]) -> None:
    manifest = read_manifest(root)
    manifest["tasks"][name] = entry
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def is_complete(root: str | Path, name: str, seed: int = 0, test_size: int = 500, image_size: int = 32) -> bool:
    """Whether ``<root>/<name>`` was fully written with these parameters by this suite version.

    Checks the manifest entry, each list file's line count and the number of PNG files per split, so a task that
    was half-written, hand-edited or written with another seed/size is not mistaken for a finished one.
    """
    root = Path(root)
    entry = _entry(name, seed, test_size, image_size)
    if read_manifest(root)["tasks"].get(name) != entry:
        return False
    folder = root / name
    for split, n in entry["lines"].items():
        try:
            with open(folder / f"{split}.txt") as handle:
                if sum(1 for _ in handle) != n:
                    return False
        except OSError:
            return False
    for split, n in split_sizes(test_size).items():
        images = folder / "images" / split
        if not images.is_dir() or sum(1 for p in os.scandir(images) if p.name.endswith(".png")) != n:
            return False
    return True


def _check(name: str, seed: int, test_size: int, image_size: int) -> None:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    if seed < 0 or test_size < 1 or image_size < 8:
        raise ValueError(f"need seed >= 0, test_size >= 1, image_size >= 8; got {seed}, {test_size}, {image_size}")


def _pool(workers: int) -> ProcessPoolExecutor:
    """A process pool, forked on Linux: spawned workers would re-import restune (and torch) before drawing a pixel."""
    fork = sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork") if fork else None)


def write_task(
    root: str | Path,
    name: str,
    seed: int = 0,
    test_size: int = 500,
    image_size: int = 32,
    workers: int = 1,
    tick: Callable[[int], Any] | None = None,
    pool: Executor | None = None,
) -> Path:
    """Write one task unconditionally (see :func:`write_suite` for the skip logic) and record it in the manifest.

    Args:
        root: suite folder; the task goes to ``<root>/<name>``.
        name: a key of :data:`~restune.suite.TASKS`.
        seed: suite seed; the same seed gives byte-identical files.
        test_size: number of test images.
        image_size: side of the square images in pixels.
        workers: processes rendering images; output is identical for any value.
        tick: called with the number of images written after each chunk (progress bars).
        pool: an executor to render in (reused across tasks by :func:`write_suite`); overrides ``workers``.

    Returns:
        The task folder.
    """
    _check(name, seed, test_size, image_size)
    if pool is None and workers > 1:
        with _pool(workers) as own:
            return write_task(root, name, seed, test_size, image_size, tick=tick, pool=own)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final, tmp, old = root / name, root / f".{name}.partial", root / f".{name}.old"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    planned = plan(name, seed, test_size)
    chunks = list(_chunks(name, seed, image_size, tmp, planned))
    for done in pool.map(_write_chunk, chunks) if pool else map(_write_chunk, chunks):
        if tick:
            tick(done)
    for split, lines in _list_lines(planned).items():
        (tmp / f"{split}.txt").write_text("".join(f"{line}\n" for line in lines))
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    _update_manifest(root, name, _entry(name, seed, test_size, image_size))
    return final


def write_suite(
    root: str | Path,
    tasks: Iterable[str] | None = None,
    seed: int = 0,
    test_size: int = 500,
    image_size: int = 32,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Path]:
    """Write every task (or ``tasks``) under ``root``, skipping those already complete with the same parameters.

    Args:
        root: suite folder.
        tasks: task names; all of :data:`~restune.suite.TASKS` when None.
        seed: suite seed.
        test_size: test images per task.
        image_size: image side in pixels.
        progress: show a tqdm bar over the images to write.
        workers: rendering processes; default ``min(8, cpu count)``. Files are identical for any value.

    Returns:
        Task name -> task folder, for every requested task (written now or found complete).
    """
    names = list(TASKS) if tasks is None else list(tasks)
    for name in names:
        _check(name, seed, test_size, image_size)
    root = Path(root)
    todo = [n for n in names if not is_complete(root, n, seed, test_size, image_size)]
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    total = len(todo) * sum(split_sizes(test_size).values())
    with ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=total, desc="writing suite", unit="img", disable=not progress))
        pool = stack.enter_context(_pool(workers)) if workers > 1 and todo else None
        for name in todo:
            bar.set_postfix_str(name)
            write_task(root, name, seed, test_size, image_size, tick=bar.update, pool=pool)
    return {name: root / name for name in names}


def read_split(root: str | Path, name: str, split: str) -> list[tuple[Path, int]]:
    """(image path, label) pairs of one list file, paths resolved against the task folder."""
    folder = Path(root) / name
    pairs = []
    for line in (folder / f"{split}.txt").read_text().splitlines():
        path, label = line.rsplit(" ", 1)
        pairs.append((folder / path, int(label)))
    return pairs
