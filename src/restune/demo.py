"""``restune demo``: the product's real job in a few minutes on a CPU, offline.

It writes one task of the offline VTAB-style suite, loads the small ViT pretrained by restune (shipped in the
package), and adapts it with the linear probe, LoRA and RLRR (two reparameterising tuners) and two Res-Tuning-Bypasses
(swift's per-token chain, and one whose lateral tuner is a token-mixing Res-Attn) trained from cached features,
through the same harness as ``restune train``. It prints a table of test accuracy, trainable parameters and the
activation memory one training step keeps for backward (full fine-tuning measured beside them for scale), and draws
the same as a PNG chart.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from restune.atomic import atomic_write, atomic_write_text
from restune.harness import run_files
from restune.harness.build import build_model, count, open_split, transforms_for
from restune.harness.config import TrainConfig, resolved_recipe
from restune.harness.loop import train
from restune.harness.memory import saved_for_backward
from restune.optional import require

__all__ = ["DemoRow", "METHODS", "run_demo", "format_results", "plot_results", "DEMO_TASK"]

DEMO_TASK = "remote"
# The FacT/NOAH recipe is tuned for ViT-B over 100 epochs; a 1M-parameter ViT trained for a few epochs needs a larger
# step. Measured on the suite (docs/suite.md); every run records these values in its config.yaml.
DEMO_LR, DEMO_BATCH = 1e-2, 32
# (label, preset, trains from cached features)
METHODS: tuple[tuple[str, str, bool], ...] = (
    ("linear probe", "linear", False),
    ("LoRA", "lora", False),
    ("RLRR", "rlrr", False),
    ("Res-Tuning-Bypass", "res_tuning_bypass", True),
    ("Res-Tuning-Bypass + Res-Attn", "res_tuning_bypass_attn", True),
)
# Differences of a few points between methods need a test split whose standard error is well under a point
# (about 0.8 at 85% on 2,000 images, 1.6 on 500); evaluation is cheap next to training.
DEMO_TEST_SIZE = 2000
MEMORY_BATCH = 32
RESULTS, CHART, DATA = "results.md", "demo.png", "data"  # inside --output
RUNS = run_files.SWEEP_RUNS  # a sweep's name for its run folders, so `restune plot <output>` finds the demo's runs
CHART_NEEDS = ("matplotlib.figure", "plot", "restune demo's chart")  # (module, extra, purpose) for optional.require


@dataclass
class DemoRow:
    """One method's outcome (accuracy None: measured for scale, not trained)."""

    method: str
    preset: str
    accuracy: float | None
    trainable: int
    trainable_without_head: int
    saved_bytes: int
    seconds: float


def _config(preset: str, cached: bool, data: Path, runs: Path, task: str, epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(
        model="restune_vit_tiny",
        tuner=preset,
        data_dir=str(data),
        dataset=task,
        epochs=epochs,
        lr=DEMO_LR,
        batch_size=DEMO_BATCH,
        seed=seed,
        bypass_cache=cached,
        output=str(runs / preset),
        device="cpu",
    )


def _memory(config: TrainConfig, num_classes: int) -> tuple[int, int, int]:
    """(saved-for-backward bytes of one step on ``MEMORY_BATCH`` images, trainable, trainable without head)."""
    recipe = resolved_recipe(config)
    torch.manual_seed(config.seed)
    model = build_model(config, num_classes, recipe).train()
    dataset = open_split(config, config.train_split, transforms_for(model, recipe)[1], num_classes=num_classes)
    images = torch.stack([dataset[i][0] for i in range(MEMORY_BATCH)])
    labels = torch.tensor([dataset[i][1] for i in range(MEMORY_BATCH)])
    saved = saved_for_backward(model, lambda: model(images), labels)
    trainable, head = count(model)
    return saved, trainable, trainable - head


def run_demo(
    output: str | Path = "restune-demo", *, task: str = DEMO_TASK, epochs: int = 5, seed: int = 0
) -> list[DemoRow]:
    """Train every method of ``METHODS`` on ``task`` and measure full fine-tuning's memory beside them."""
    from restune.suite import write_suite

    output = Path(output)
    data = write_suite(output / DATA, tasks=[task], seed=seed, test_size=DEMO_TEST_SIZE)[task].parent
    runs = output / RUNS
    shutil.rmtree(runs, ignore_errors=True)  # a demo always trains afresh
    rows = []
    for label, preset, cached in METHODS:
        config = _config(preset, cached, data, runs, task, epochs, seed)
        print(f"\n== {label} ({preset}{', from cached features' if cached else ''})")
        began = time.perf_counter()
        summary = train(config)
        seconds = time.perf_counter() - began
        saved, trainable, without_head = _memory(config, int(summary["num_classes"]))
        rows.append(DemoRow(label, preset, float(summary["accuracy"]), trainable, without_head, saved, seconds))
    full = _config("full", False, data, runs, task, epochs, seed)
    saved, trainable, without_head = _memory(full, _classes(full))
    rows.append(DemoRow("full fine-tuning (memory only)", "full", None, trainable, without_head, saved, 0.0))
    return rows


def _classes(config: TrainConfig) -> int:
    return open_split(config, config.train_split).num_classes


def format_results(rows: list[DemoRow], task: str = DEMO_TASK) -> str:
    """A Markdown table users can paste."""
    full = next((r.saved_bytes for r in rows if r.preset == "full"), 0)
    lines = [
        f"Task `{task}` of the offline suite (train800val200 -> test), backbone `restune_vit_tiny` (pretrained).",
        "",
        "| method | test accuracy | trainable (no head) | trainable (with head) | saved for backward | vs full "
        "| time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        accuracy = f"{r.accuracy:.1f}%" if r.accuracy is not None else "not trained"
        ratio = f"{r.saved_bytes / full:.3f}x" if full else "-"
        seconds = f"{r.seconds:.0f} s" if r.seconds else "-"
        lines.append(
            f"| {r.method} | {accuracy} | {r.trainable_without_head:,} | {r.trainable:,} | "
            f"{r.saved_bytes / 2**20:.1f} MiB | {ratio} | {seconds} |"
        )
    return "\n".join(lines)


def plot_results(rows: list[DemoRow], path: str | Path) -> Path:
    """Accuracy and saved-for-backward memory per method, side by side, as a PNG (written atomically)."""
    figure = require(*CHART_NEEDS).Figure(figsize=(13, 4.5), layout="constrained")
    left, right = figure.subplots(1, 2)
    trained = [r for r in rows if r.accuracy is not None]
    left.bar([r.method for r in trained], [r.accuracy for r in trained], color="tab:blue")
    left.set_ylabel("test accuracy (%)")
    left.set_ylim(0, 1.25 * max((r.accuracy for r in trained), default=1.0))  # room for the labels
    left.set_title("accuracy after tuning")
    for index, r in enumerate(trained):
        left.annotate(f"{r.accuracy:.1f}%\n{r.trainable_without_head:,} params", (index, r.accuracy), ha="center",
                      va="bottom", fontsize=8)  # fmt: skip
    right.bar([r.method for r in rows], [r.saved_bytes / 2**20 for r in rows], color="tab:orange")
    right.set_ylabel("MiB saved for backward (one step)")
    right.set_title("activation memory of one training step")
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))


def main_demo(output: str | Path = "restune-demo", *, task: str = DEMO_TASK, epochs: int = 5, seed: int = 0) -> int:
    """The ``restune demo`` command: train, print the table, write results.md and demo.png."""
    require(*CHART_NEEDS)  # before minutes of training, not after
    began = time.perf_counter()
    rows = run_demo(output, task=task, epochs=epochs, seed=seed)
    table = format_results(rows, task)
    output = Path(output)
    results = atomic_write_text(output / RESULTS, table + "\n")
    chart = plot_results(rows, output / CHART)
    print("\n" + table)
    print(f"\nwrote {results} and {chart} in {time.perf_counter() - began:.0f} s")
    return 0
