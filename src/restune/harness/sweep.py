"""Sweeps: every preset on every task under one protocol, then one table (``restune sweep``).

Under ``val`` each (task, preset) first trains once per grid point on train800 and scores val200; the best point
(ties: the first) is retrained on train800val200 and its final test accuracy is the result. Under ``final`` and
``paper`` each pair trains once. Finished runs (a ``summary.csv`` in their folder) are reused, so an interrupted sweep
continues where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from restune.atomic import atomic_write_text
from restune.data import VTAB_GROUPS
from restune.harness import run_files
from restune.harness.build import is_bypass
from restune.harness.config import TrainConfig, parse_scalar
from restune.harness.loop import train, write_summary
from restune.harness.tables import collect, sweep_table

__all__ = ["parse_grid", "sweep", "task_groups", "VAL_METRIC"]

VAL_METRIC = "test accuracy at the last epoch, hyper-parameters chosen on val200 (trained on train800val200)"
GRID_KEYS = ("lr", "weight_decay", "batch_size", "epochs", "warmup_epochs")


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["lr=1e-3,1e-2", "weight_decay=0,1e-4"]`` -> ``{"lr": [0.001, 0.01], "weight_decay": [0, 0.0001]}``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in GRID_KEYS or not values:
            raise ValueError(f"grid entry {item!r} must be key=v1,v2,... with key one of {', '.join(GRID_KEYS)}")
        grid[key] = [parse_scalar(v) for v in values.split(",")]
    return grid


def task_groups(tasks: Sequence[str]) -> dict[str, str] | None:
    """VTAB (and offline-suite) groups of the tasks, or None when any task has no group."""
    known = {name: info.group for name, info in VTAB_GROUPS.items()}
    try:
        from restune.suite import SUITE_GROUPS

        known.update(SUITE_GROUPS)
    except ImportError:  # pragma: no cover - the suite ships with restune; tolerate a partial install
        pass
    return {task: known[task] for task in tasks} if all(task in known for task in tasks) else None


def _label(point: Mapping[str, Any]) -> str:
    return "-".join(f"{k}{v}" for k, v in point.items()) or "default"


def _run(config: TrainConfig) -> dict[str, Any]:
    summary = Path(config.output) / run_files.SUMMARY
    if summary.is_file():
        with summary.open(newline="", encoding="utf-8") as file:
            return next(csv.DictReader(file))
    return train(config)


def _selected(base: TrainConfig, grid: dict[str, list[Any]], folder: Path) -> dict[str, Any]:
    best: tuple[float, dict[str, Any]] | None = None
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values, strict=True))
        run = dataclasses.replace(base, protocol="val", output=str(folder / _label(point)), **point)
        accuracy = float(_run(run)["accuracy"])
        if best is None or accuracy > best[0]:
            best = (accuracy, point)
    assert best is not None
    return best[1]


def sweep(
    base: TrainConfig,
    tasks: Sequence[str],
    presets: Sequence[str],
    output: str | Path,
    *,
    grid: dict[str, list[Any]] | None = None,
) -> Path:
    """Run every (task, preset) and write ``sweep.md`` and ``sweep.csv`` (atomically) into ``output``."""
    output = Path(output)
    if base.protocol == "val" and not grid:
        raise ValueError("protocol 'val' chooses hyper-parameters on val200: give a grid, e.g. --grid lr=1e-3,1e-2")
    if grid and base.protocol != "val":
        raise ValueError(f"a grid needs protocol 'val' (hyper-parameters chosen on val200), not {base.protocol!r}")
    run_dirs = []
    for task, preset in itertools.product(tasks, presets):
        folder = run_files.sweep_run(output, task, preset)
        cached = base.bypass_cache and is_bypass(preset)  # --bypass-cache applies to bypass presets
        config = dataclasses.replace(
            base, dataset=task, tuner=preset, output=str(folder), resume=False, bypass_cache=cached
        )
        if base.protocol == "val":
            point = _selected(config, grid or {}, run_files.sweep_select(output, task, preset))
            config = dataclasses.replace(config, protocol="final", **point)
            row = _run(config)
            row.update(protocol="val", metric=f"{VAL_METRIC}; chosen {_label(point)}")
            write_summary(folder / run_files.SUMMARY, row)
        else:
            _run(config)
        run_dirs.append(folder)
    table = sweep_table(collect(run_dirs), task_groups(tasks))
    atomic_write_text(output / run_files.SWEEP_TABLE, table.to_markdown() + "\n")
    table.to_csv(output / run_files.SWEEP_CSV)
    return output
