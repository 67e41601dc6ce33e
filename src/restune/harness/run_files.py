"""The files of a run folder and of a sweep folder: one place for the names the writers and the readers share.

The trainer (``harness/loop.py``), ``restune eval``, ``restune sweep`` and the demo write these files; the tables,
the plots and ``restune plot`` read them, possibly on another machine. Both sides take the names and the summary's
columns from here, so a renamed file or a new column cannot reach one side only. It uses the standard library
alone, like the readers.

A run folder holds::

    config.yaml        the resolved settings and recipe (what --resume checks)
    metrics.jsonl      one JSON object per epoch
    summary.csv        a header and one row, columns SUMMARY_FIELDS, written when the run finishes
    train_state.pt     the last epoch's trainable tensors and optimizer (resumption)
    tuners/            the trained tuners and head (restune.save)
    cache/<split>/     feature caches of a Bypass trained with --bypass-cache
    eval-<split>.json  the result of ``restune eval`` on a split

A sweep folder holds ``sweep.md`` and ``sweep.csv`` (the table), ``runs/<task>/<preset>/`` (one run folder per
cell) and, under protocol ``val``, ``select/<task>/<preset>/<grid point>/`` (the selection runs).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "CONFIG",
    "METRICS",
    "SUMMARY",
    "STATE",
    "TUNERS",
    "CACHE",
    "SWEEP_TABLE",
    "SWEEP_CSV",
    "SWEEP_RUNS",
    "SWEEP_SELECT",
    "SUMMARY_FIELDS",
    "eval_name",
    "is_run",
    "sweep_run",
    "sweep_select",
    "find_runs",
]

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.csv"
STATE = "train_state.pt"
TUNERS = "tuners"
CACHE = "cache"
SWEEP_TABLE = "sweep.md"
SWEEP_CSV = "sweep.csv"
SWEEP_RUNS = "runs"
SWEEP_SELECT = "select"

#: The columns of ``summary.csv``, in the order the trainer writes them.
SUMMARY_FIELDS = (
    "task",
    "preset",
    "model",
    "protocol",
    "metric",
    "accuracy",
    "best_epoch",
    "epochs",
    "trainable",
    "trainable_without_head",
    "head",
    "num_classes",
    "lr",
    "weight_decay",
    "batch_size",
    "seed",
    "recipe",
    "test_images",
)


def eval_name(split: str) -> str:
    """The file ``restune eval`` writes for ``split`` (one per split, so evaluations on several splits coexist)."""
    return f"eval-{split}.json"


def is_run(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a finished run (the trainer writes ``summary.csv`` last)."""
    return (Path(folder) / SUMMARY).is_file()


def sweep_run(sweep: str | os.PathLike[str], task: str, preset: str) -> Path:
    """The run folder of one (task, preset) cell of a sweep."""
    return Path(sweep) / SWEEP_RUNS / task / preset


def sweep_select(sweep: str | os.PathLike[str], task: str, preset: str) -> Path:
    """The folder of one cell's selection runs (protocol ``val``), one sub-folder per grid point."""
    return Path(sweep) / SWEEP_SELECT / task / preset


def find_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Finished run folders among ``paths``: each path that is one, else the sweep cells found under it, sorted.

    Selection runs (under ``select/``) are not cells of the table, so only ``runs/`` is searched inside a sweep.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if is_run(path):
            found.append(path)
        else:
            found += sorted(p.parent for p in path.glob(f"{SWEEP_RUNS}/**/{SUMMARY}"))
    return found
