"""Read training-run folders and turn them into one sweep table (presets x tasks) per protocol.

A run folder, as the trainer writes it, holds ``summary.csv`` (a header and one data row, see
:data:`SUMMARY_COLUMNS`) and ``metrics.jsonl`` (one JSON object per epoch); their names and the columns come from
:mod:`restune.harness.run_files`, which the writers use too. This module only reads those files, with the standard
library alone, so it can summarise runs produced on other machines.

The table follows the conventions papers use for VTAB-1k, made explicit because they change the headline number:
the mean over tasks and the mean of the group means (Natural, Specialized, Structured) are both shown, a preset with
a missing task gets no mean at all (a mean over fewer tasks is not comparable), and one table states one protocol.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from restune.atomic import atomic_write, atomic_write_text
from restune.harness import run_files

__all__ = [
    "SUMMARY_NAME",
    "METRICS_NAME",
    "SUMMARY_COLUMNS",
    "PROTOCOLS",
    "VTAB_TASK_ORDER",
    "GROUP_ORDER",
    "MISSING",
    "MEAN_TASKS",
    "MEAN_GROUPS",
    "PARAMS_WITHOUT_HEAD",
    "PARAMS_WITH_HEAD",
    "read_summary",
    "read_metrics",
    "collect",
    "sweep_table",
    "SweepTable",
    "atomic_write",
]

SUMMARY_NAME = run_files.SUMMARY
METRICS_NAME = run_files.METRICS

#: The columns of ``summary.csv``, in the order the trainer writes them (the schema's, under the readers' name).
SUMMARY_COLUMNS = run_files.SUMMARY_FIELDS

_INT_COLUMNS = frozenset(
    ["best_epoch", "epochs", "trainable", "trainable_without_head", "head", "num_classes", "batch_size", "seed"]
    + ["test_images"]
)
_FLOAT_COLUMNS = frozenset({"accuracy", "lr", "weight_decay"})
#: Columns a table cannot do without; the others may be empty (parsed as None).
_REQUIRED_VALUES = ("task", "preset", "protocol", "accuracy")

#: The three evaluation protocols the trainer knows.
PROTOCOLS = ("final", "paper", "val")

#: The 19 VTAB-1k tasks (folder names of the shared archive) in the order papers print them. Kept here rather than
#: imported so that reading results never needs the data modules.
VTAB_TASK_ORDER = (
    "cifar",
    "caltech101",
    "dtd",
    "oxford_flowers102",
    "oxford_iiit_pet",
    "svhn",
    "sun397",
    "patch_camelyon",
    "eurosat",
    "resisc45",
    "diabetic_retinopathy",
    "clevr_count",
    "clevr_dist",
    "dmlab",
    "kitti",
    "dsprites_loc",
    "dsprites_ori",
    "smallnorb_azi",
    "smallnorb_ele",
)

#: The VTAB groups, in the order papers print them (and the order of the group-mean columns).
GROUP_ORDER = ("Natural", "Specialized", "Structured")

#: What a missing cell shows in Markdown (CSV leaves it empty so that it parses as NaN).
MISSING = "—"
MEAN_TASKS = "mean (tasks)"
MEAN_GROUPS = "mean (groups)"
PARAMS_WITHOUT_HEAD = "params without head"
PARAMS_WITH_HEAD = "params with head (mean over tasks)"
PROTOCOL = "protocol"
PRESET = "preset"


def _parse(column: str, text: str, source: Path) -> str | int | float | None:
    if column not in _INT_COLUMNS and column not in _FLOAT_COLUMNS:
        return text
    if text.strip() == "":
        return None
    try:
        if column in _FLOAT_COLUMNS:
            return float(text)
        number = float(text)  # tolerate "12.0" from writers that format every number as float
        if not number.is_integer():
            raise ValueError(text)
        return int(number)
    except ValueError:
        kind = "a number" if column in _FLOAT_COLUMNS else "an integer"
        raise ValueError(f"{source}: column {column!r} should be {kind}, got {text!r}") from None


def read_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a run folder's ``summary.csv`` into one dict with typed values.

    Counts and epochs become ``int``, accuracy/lr/weight decay ``float``, the rest stay ``str``; an empty numeric field
    becomes ``None`` (so a partially filled summary is still readable), except the values every table needs. The
    folder is added as ``run_dir`` so that later errors can name the run they come from.

    Args:
        run_dir: A folder written by the trainer.

    Returns:
        The summary row, keyed by :data:`SUMMARY_COLUMNS` plus ``run_dir``.

    Raises:
        FileNotFoundError: The folder has no ``summary.csv`` (the run did not finish, or the path is wrong).
        ValueError: The file lacks a column, does not hold exactly one data row, or a value does not parse.
    """
    folder = Path(run_dir)
    path = folder / SUMMARY_NAME
    if not path.is_file():
        raise FileNotFoundError(f"run folder {folder} has no {SUMMARY_NAME} (unfinished run, or not a run folder?)")
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        missing = [c for c in SUMMARY_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        records = [r for r in reader if any((v or "").strip() for v in r.values())]
    if len(records) != 1:
        raise ValueError(f"{path}: expected exactly one data row, found {len(records)}")
    row: dict[str, Any] = {c: _parse(c, records[0][c] or "", path) for c in SUMMARY_COLUMNS}
    empty = [c for c in _REQUIRED_VALUES if row[c] in (None, "")]
    if empty:
        raise ValueError(f"{path}: empty value(s) for {', '.join(empty)}")
    row["run_dir"] = str(folder)
    return row


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a run folder's ``metrics.jsonl`` (one object per epoch), skipping blank lines.

    Args:
        run_dir: A folder written by the trainer.

    Returns:
        The epoch records in file order.

    Raises:
        FileNotFoundError: The folder has no ``metrics.jsonl``.
        ValueError: A line is not a JSON object (the message gives the line number).
    """
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"run folder {Path(run_dir)} has no {METRICS_NAME}")
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            records.append(record)
    return records


def collect(run_dirs: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Read the summaries of several run folders, in the given order (which sets the table's first-seen order).

    Args:
        run_dirs: Run folders; every one must hold a ``summary.csv``.

    Returns:
        One typed summary dict per folder (see :func:`read_summary`).

    Raises:
        FileNotFoundError: Naming the first folder without ``summary.csv``; failing loudly beats a table that
            silently lacks a run.
    """
    return [read_summary(d) for d in run_dirs]


def _group_of(groups: Mapping[str, str], task: str) -> str:
    name = str(groups[task]).strip()
    for group in GROUP_ORDER:
        if name.lower() == group.lower():
            return group
    raise ValueError(f"task {task!r} has group {name!r}; expected one of {', '.join(GROUP_ORDER)} (any case)")


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


@dataclass(frozen=True)
class SweepTable:
    """One protocol's results: a row per preset, columns as listed in :attr:`columns`.

    Values are kept unformatted (``float`` accuracies, ``int``/``float`` parameter counts, ``None`` for a missing cell)
    so callers can compute with them; :meth:`to_markdown` and :meth:`to_csv` format them.

    Attributes:
        columns: Column labels, starting with ``"preset"``.
        rows: One tuple per preset, aligned with ``columns``.
        protocol: The protocol shared by every run (``final``, ``paper`` or ``val``).
        metric: The metric label the trainer wrote for that protocol.
        tasks: The task columns, in display order.
        groups: The group-mean columns present (empty when groups do not apply).
    """

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    protocol: str
    metric: str
    tasks: tuple[str, ...]
    groups: tuple[str, ...] = field(default=())

    @property
    def presets(self) -> tuple[str, ...]:
        """The presets, in row order."""
        return tuple(row[0] for row in self.rows)

    def value(self, preset: str, column: str) -> Any:
        """The raw value of one cell (``None`` when missing), for tests and further computation."""
        try:
            return self.rows[self.presets.index(preset)][self.columns.index(column)]
        except ValueError:
            raise KeyError(f"no cell ({preset!r}, {column!r}) in the table") from None

    def _kind(self, column: str) -> str:
        if column in (PRESET, PROTOCOL):
            return "text"
        if column in (PARAMS_WITHOUT_HEAD, PARAMS_WITH_HEAD):
            return "count"
        return "accuracy"

    def to_markdown(self) -> str:
        """Render as a Markdown table preceded by a line stating the protocol and metric.

        Accuracies get 2 decimals and parameter counts thousands separators (means of counts are rounded to whole
        parameters); missing cells show an em dash.
        """

        def cell(column: str, value: Any) -> str:
            if value is None:
                return MISSING
            kind = self._kind(column)
            if kind == "accuracy":
                return f"{value:.2f}"
            if kind == "count":
                return f"{round(value):,}"
            return str(value)

        align = ["---" if self._kind(c) == "text" else "---:" for c in self.columns]
        lines = [
            f"Protocol `{self.protocol}`: {self.metric}. Accuracies in %.",
            "",
            "| " + " | ".join(self.columns) + " |",
            "| " + " | ".join(align) + " |",
        ]
        for row in self.rows:
            lines.append("| " + " | ".join(cell(c, v) for c, v in zip(self.columns, row, strict=True)) + " |")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write the table as CSV, atomically, with full-precision numbers and empty missing cells.

        The file goes through :func:`restune.atomic.atomic_write`, so a reader never sees half a table and a crash
        leaves the previous file intact.

        Args:
            path: Destination file; its folder is created if needed.

        Returns:
            The destination path.
        """

        def cell(value: Any) -> str:
            if value is None:
                return ""
            return repr(value) if isinstance(value, float) else str(value)  # repr: shortest exact round-trip

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows([cell(v) for v in row] for row in self.rows)
        target = Path(path)
        atomic_write_text(target, buffer.getvalue())
        return target


def sweep_table(rows: Sequence[Mapping[str, Any]], groups: Mapping[str, str] | None = None) -> SweepTable:
    """Arrange run summaries as one row per preset and one column per task, with the means papers report.

    Presets keep their first-seen order. Tasks are ordered by group (when groups apply), then by VTAB order for VTAB
    tasks, then first-seen, so a VTAB sweep reads like the papers' tables whatever order the runs finished in.

    Group-mean columns and ``mean (groups)`` appear only when ``groups`` names a group for every task: a partial
    mapping would silently drop tasks from the group means. ``params with head`` is the mean of ``trainable`` over
    tasks because each task has its own head size. A preset missing any task gets ``None`` for every mean (and the
    with-head count) rather than a mean over fewer tasks, which would not be comparable with the other rows.

    Args:
        rows: Summaries from :func:`read_summary`/:func:`collect` (or dicts with the same keys).
        groups: Optional mapping task -> group name, one of Natural/Specialized/Structured in any case; extra tasks in
            the mapping are ignored.

    Returns:
        The table.

    Raises:
        ValueError: No rows; rows mixing protocols, or metric labels that differ before their first ``;`` (a table
            states one protocol and one metric); two runs for the same (preset, task) cell; a group name outside the
            three VTAB groups.
    """
    if not rows:
        raise ValueError("no runs to tabulate")
    protocols = _unique(str(r["protocol"]) for r in rows)
    if len(protocols) != 1:
        raise ValueError(f"runs mix protocols {protocols}; build one table per protocol")
    metric = _shared_metric(protocols[0], [str(r.get("metric", "")) for r in rows])

    cells: dict[tuple[str, str], Mapping[str, Any]] = {}
    for row in rows:
        key = (str(row["preset"]), str(row["task"]))
        if key in cells:
            first, second = cells[key].get("run_dir", "?"), row.get("run_dir", "?")
            raise ValueError(f"two runs for preset {key[0]!r} on task {key[1]!r} ({first}, {second})")
        cells[key] = row
    presets = _unique(p for p, _ in cells)
    seen = _unique(t for _, t in cells)

    task_group: dict[str, str] = {}
    if groups is not None and all(t in groups for t in seen):
        task_group = {t: _group_of(groups, t) for t in seen}

    def order(task: str) -> tuple[int, int, int]:
        group = GROUP_ORDER.index(task_group[task]) if task_group else 0
        vtab = VTAB_TASK_ORDER.index(task) if task in VTAB_TASK_ORDER else len(VTAB_TASK_ORDER)
        return group, vtab, seen.index(task)

    tasks = sorted(seen, key=order)
    group_names = [g for g in GROUP_ORDER if g in task_group.values()]

    columns = [PRESET, *tasks, *group_names, MEAN_TASKS]
    if task_group:
        columns.append(MEAN_GROUPS)
    columns += [PARAMS_WITHOUT_HEAD, PARAMS_WITH_HEAD, PROTOCOL]

    table_rows = []
    for preset in presets:
        runs = [cells.get((preset, t)) for t in tasks]
        accuracies = [None if r is None else float(r["accuracy"]) for r in runs]
        values: list[Any] = [preset, *accuracies]
        complete = None not in accuracies
        if complete:
            found = [float(a) for a in accuracies if a is not None]
            by_task = dict(zip(tasks, found, strict=True))
            group_means = [_mean([a for t, a in by_task.items() if task_group[t] == g]) for g in group_names]
            values += [*group_means, _mean(found)]
            if task_group:
                values.append(_mean(group_means))
        else:
            values += [None] * (len(group_names) + 1 + bool(task_group))
        present = [r for r in runs if r is not None]
        without_head = [r["trainable_without_head"] for r in present if r.get("trainable_without_head") is not None]
        with_head = [r["trainable"] for r in present if r.get("trainable") is not None]
        # The backbone's trainable count does not depend on the task; a mean only guards against odd inputs.
        values.append(_count_mean(without_head) if without_head else None)
        values.append(_count_mean(with_head) if complete and len(with_head) == len(tasks) else None)
        values.append(protocols[0])
        table_rows.append(tuple(values))

    return SweepTable(
        columns=tuple(columns),
        rows=tuple(table_rows),
        protocol=protocols[0],
        metric=metric,
        tasks=tuple(tasks),
        groups=tuple(group_names),
    )


def _shared_metric(protocol: str, labels: Sequence[str]) -> str:
    """The one metric label a table states.

    Under ``val`` the sweep appends the chosen settings to each run's label (``"...; chosen lr0.001"``), so labels that
    agree before the first ``;`` are one metric with per-run details; labels that differ before it are not.
    """
    unique = _unique(labels)
    if len(unique) == 1:
        return unique[0]
    bases = _unique(label.split(";")[0].strip() for label in unique)
    if len(bases) != 1:
        raise ValueError(f"runs of protocol {protocol!r} mix metric labels {bases}; build one table per metric")
    return f"{bases[0]}; settings chosen per run (see each run's {SUMMARY_NAME})"


def _count_mean(counts: Sequence[int]) -> int | float:
    """Mean of parameter counts, kept an ``int`` when exact so the CSV does not show ``1234.0``."""
    total = sum(int(c) for c in counts)
    return total // len(counts) if total % len(counts) == 0 else total / len(counts)
