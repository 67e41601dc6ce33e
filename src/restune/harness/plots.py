"""Figures for a sweep: training curves per run, and mean accuracy against trainable parameters per preset.

Figures are built on :class:`matplotlib.figure.Figure` directly rather than through ``pyplot``: no global figure
state, no backend selection and no window, so plotting is safe in tests, on headless machines and from threads.
matplotlib is the ``plot`` extra, imported when a figure is drawn, so the rest of the harness works without it. Files
are written with :func:`restune.atomic.atomic_write`, like the tables, so a watcher never sees half a PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from restune.atomic import atomic_write
from restune.harness import run_files
from restune.harness.tables import (
    MEAN_TASKS,
    PARAMS_WITH_HEAD,
    PARAMS_WITHOUT_HEAD,
    read_metrics,
    read_summary,
    sweep_table,
)
from restune.optional import require

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_curves", "plot_accuracy_vs_params"]

_DPI = 110


def _figure(**kwargs: Any) -> Figure:
    return require("matplotlib.figure", "plot", "restune plot").Figure(**kwargs)


def _save(figure: Figure, path: str | os.PathLike[str]) -> Path:
    # The temporary file's name ends in .tmp, so the format is given rather than guessed from the suffix.
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=_DPI))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _label(run_dir: Path) -> str:
    # A run still in progress has metrics but no summary yet; its curves are still worth seeing.
    if not run_files.is_run(run_dir):
        return run_dir.name
    summary = read_summary(run_dir)
    return f"{summary['preset']} / {summary['task']}"


def plot_curves(run_dirs: Iterable[str | os.PathLike[str]], path: str | os.PathLike[str]) -> Path:
    """Plot training loss (left) and evaluation accuracy (right) against epoch, one line per run.

    Runs are labelled ``preset / task`` from their summary, or by folder name while a run has no summary yet. A run
    without evaluation points (or without any) still gets its loss line; the accuracy panel then says so instead of
    showing empty axes. Evaluation accuracy is plotted as the trainer logged it, with the split(s) in the axis label,
    since ``val200`` and ``test`` accuracies are not interchangeable.

    Args:
        run_dirs: Run folders, each with a ``metrics.jsonl``.
        path: Destination PNG; its folder is created if needed.

    Returns:
        The destination path.

    Raises:
        ValueError: No run folders were given.
        FileNotFoundError: A folder has no ``metrics.jsonl``.
        ImportError: matplotlib is not installed (the ``plot`` extra).
    """
    folders = [Path(d) for d in run_dirs]
    if not folders:
        raise ValueError("no run folders to plot")
    figure = _figure(figsize=(11.0, 4.4), layout="constrained")
    loss_axes, acc_axes = figure.subplots(1, 2)
    splits: list[str] = []
    any_eval = False
    for index, folder in enumerate(folders):
        records = read_metrics(folder)
        style = {"color": f"C{index % 10}", "linestyle": ("-", "--", ":", "-.")[(index // 10) % 4]}
        loss = [(r["epoch"], r["train_loss"]) for r in records if _finite(r.get("train_loss"))]
        evals = [(r["epoch"], r["eval_acc"]) for r in records if _finite(r.get("eval_acc"))]
        splits += [str(r["eval_split"]) for r in records if _finite(r.get("eval_acc")) and r.get("eval_split")]
        # Plot even empty series so every run appears in the legend with its colour.
        loss_axes.plot([e for e, _ in loss], [v for _, v in loss], label=_label(folder), **style)
        if evals:
            any_eval = True
            acc_axes.plot([e for e, _ in evals], [v for _, v in evals], marker="o", markersize=3, **style)
    loss_axes.set_title("training loss")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("train loss")
    acc_axes.set_title("evaluation accuracy")
    acc_axes.set_xlabel("epoch")
    split_names = ", ".join(dict.fromkeys(splits))
    acc_axes.set_ylabel(f"accuracy on {split_names} (%)" if split_names else "accuracy (%)")
    if not any_eval:
        acc_axes.text(0.5, 0.5, "no evaluation points", transform=acc_axes.transAxes, ha="center", va="center")
    for axes in (loss_axes, acc_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.legend(loc="outside lower center", ncols=min(len(folders), 4), fontsize="small")
    return _save(figure, path)


def plot_accuracy_vs_params(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, with_head: bool = False
) -> Path:
    """Plot each preset's mean accuracy over tasks against its trainable parameters (log x axis).

    Points come from :func:`~restune.harness.tables.sweep_table`, so the same rules hold: one protocol per figure,
    and a preset missing a task is left out (and listed in a note) rather than plotted with a mean over fewer tasks.
    A log axis cannot show zero, yet a linear probe has no trainable parameters outside the head: such presets are
    drawn hollow one decade left of the smallest positive count, past a dotted line, with a note saying so.

    Args:
        rows: Run summaries (see :func:`~restune.harness.tables.read_summary`).
        path: Destination PNG; its folder is created if needed.
        with_head: Use the mean over tasks of the count with the task's head instead of the count without head.

    Returns:
        The destination path.

    Raises:
        ValueError: No rows, or rows mixing protocols (see :func:`~restune.harness.tables.sweep_table`).
        ImportError: matplotlib is not installed (the ``plot`` extra).
    """
    table = sweep_table(rows)
    column = PARAMS_WITH_HEAD if with_head else PARAMS_WITHOUT_HEAD
    points: list[tuple[str, float, float]] = []
    omitted: list[str] = []
    for preset in table.presets:
        accuracy, params = table.value(preset, MEAN_TASKS), table.value(preset, column)
        if accuracy is None or params is None:
            omitted.append(preset)
        else:
            points.append((preset, float(params), float(accuracy)))

    figure = _figure(figsize=(7.5, 5.0), layout="constrained")
    axes = figure.subplots()
    axes.set_xscale("log")
    positive = [p for _, p, _ in points if p > 0]
    zero_x = 10.0 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1.0
    notes: list[str] = []
    for name, params, accuracy in points:
        x = params if params > 0 else zero_x
        hollow = params <= 0
        axes.plot([x], [accuracy], marker="o", markersize=7, color="C0", markerfacecolor="white" if hollow else "C0")
        text = f"{name} (0 params)" if hollow else name
        axes.annotate(text, (x, accuracy), xytext=(5, 4), textcoords="offset points", fontsize="small")
    if any(p <= 0 for _, p, _ in points):
        if positive:
            axes.axvline(zero_x * math.sqrt(10.0), color="grey", linestyle=":", linewidth=1)
        notes.append(f"hollow: 0 trainable parameters (e.g. linear probe), drawn at x = {zero_x:,.0f} for placement")
    if points:
        xs = [p if p > 0 else zero_x for _, p, _ in points]
        axes.set_xlim(min(xs) / 3.0, max(xs) * 3.0)
    else:
        axes.set_xlim(1.0, 1e8)
        notes.append("no preset has a result on every task")
    if omitted:
        notes.append(f"left out (missing tasks): {', '.join(omitted)}")
    head = "with head, mean over tasks" if with_head else "without head"
    axes.set_xlabel(f"trainable parameters ({head})")
    axes.set_ylabel(f"mean accuracy over {len(table.tasks)} tasks (%)")
    axes.set_title(f"protocol {table.protocol}: {table.metric}", fontsize="medium")
    axes.grid(alpha=0.3, which="both")
    if notes:
        figure.text(0.01, 0.005, "\n".join(notes), fontsize="x-small", va="bottom", ha="left", color="dimgrey")
        figure.get_layout_engine().set(rect=(0.0, 0.04 * len(notes), 1.0, 1.0 - 0.04 * len(notes)))
    return _save(figure, path)
