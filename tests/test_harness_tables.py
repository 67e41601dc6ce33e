"""Sweep tables and plots from hand-written run folders (no training, no torch needed by the code under test)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from restune.harness.plots import plot_accuracy_vs_params, plot_curves
from restune.harness.tables import (
    MEAN_GROUPS,
    MEAN_TASKS,
    PARAMS_WITH_HEAD,
    PARAMS_WITHOUT_HEAD,
    SUMMARY_COLUMNS,
    collect,
    read_metrics,
    read_summary,
    sweep_table,
)

FINAL = "test accuracy at the last epoch"
PAPER = "max test accuracy over epochs: test-selected, as in the official code"
# ViT-B/16 heads (768 * classes + classes): cifar 100 classes, dtd 47, kitti 4.
HEADS = {"cifar": 76_900, "dtd": 36_143, "kitti": 3_076}
CLASSES = {"cifar": 100, "dtd": 47, "kitti": 4}
GROUPS = {"cifar": "natural", "dtd": "Natural", "kitti": "STRUCTURED", "eurosat": "specialized"}

# Hand-computed example: 2 natural tasks (cifar, dtd) + 1 structured (kitti).
#   restune: Natural (70 + 80.5) / 2 = 75.25, Structured 60.25, mean (tasks) 210.75 / 3 = 70.25,
#            mean (groups) (75.25 + 60.25) / 2 = 67.75; with head 500,000 + 116,119 / 3 = 538,706.33
#   linear:  Natural 65, Structured 50, mean (tasks) 60, mean (groups) 57.5; with head 116,119 / 3 = 38,706.33
ACCURACY = {
    "restune": {"kitti": 60.25, "cifar": 70.0, "dtd": 80.5},
    "linear": {"kitti": 50.0, "cifar": 60.0, "dtd": 70.0},
}
WITHOUT_HEAD = {"restune": 500_000, "linear": 0, "lora": 294_912}


def write_run(
    root: Path,
    preset: str,
    task: str,
    accuracy: float,
    *,
    protocol: str = "final",
    metric: str = FINAL,
    eval_points: bool = True,
    epochs: int = 4,
) -> Path:
    run = root / f"{preset}-{task}-{protocol}"
    run.mkdir(parents=True)
    values = {
        "task": task,
        "preset": preset,
        "model": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
        "protocol": protocol,
        "metric": metric,
        "accuracy": accuracy,
        "best_epoch": epochs,
        "epochs": epochs,
        "trainable": WITHOUT_HEAD[preset] + HEADS[task],
        "trainable_without_head": WITHOUT_HEAD[preset],
        "head": HEADS[task],
        "num_classes": CLASSES[task],
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "batch_size": 32,
        "seed": 42,
        "recipe": "paper",
        "test_images": 711,
    }
    with open(run / "summary.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerow(values)
    with open(run / "metrics.jsonl", "w") as file:
        for epoch in range(1, epochs + 1):
            record = {
                "epoch": epoch,
                "step": epoch * 25,
                "lr": 1e-3 / epoch,
                "train_loss": 2.0 / epoch,
                "train_acc": None,
                "eval_split": "test" if eval_points else None,
                "eval_acc": accuracy - 10 / epoch if eval_points else None,
                "seconds": 1.5,
            }
            file.write(json.dumps(record) + "\n")
    return run


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    """Runs in scrambled order: kitti first, so VTAB order must be restored; lora lacks kitti."""
    folders = [write_run(tmp_path, p, t, a) for p, tasks in ACCURACY.items() for t, a in tasks.items()]
    folders += [write_run(tmp_path, "lora", "dtd", 79.0), write_run(tmp_path, "lora", "cifar", 71.5)]
    return folders


def test_read_summary_types(runs: list[Path]) -> None:
    row = read_summary(runs[0])
    assert row["task"] == "kitti" and row["preset"] == "restune"
    assert row["accuracy"] == 60.25 and isinstance(row["accuracy"], float)
    assert row["trainable"] == 503_076 and isinstance(row["trainable"], int)
    assert isinstance(row["seed"], int) and isinstance(row["lr"], float)
    assert row["run_dir"] == str(runs[0])
    assert len(read_metrics(runs[0])) == 4


def test_group_means_and_overall_means(runs: list[Path]) -> None:
    table = sweep_table(collect(runs), GROUPS)
    assert table.tasks == ("cifar", "dtd", "kitti")  # VTAB order, not the order the runs were given
    assert table.presets == ("restune", "linear", "lora")  # first-seen order
    assert table.columns == (
        "preset",
        "cifar",
        "dtd",
        "kitti",
        "Natural",
        "Structured",
        MEAN_TASKS,
        MEAN_GROUPS,
        PARAMS_WITHOUT_HEAD,
        PARAMS_WITH_HEAD,
        "protocol",
    )
    assert table.value("restune", "Natural") == 75.25
    assert table.value("restune", "Structured") == 60.25
    assert table.value("restune", MEAN_TASKS) == 70.25
    assert table.value("restune", MEAN_GROUPS) == 67.75
    assert table.value("linear", MEAN_TASKS) == 60.0
    assert table.value("linear", MEAN_GROUPS) == 57.5
    assert table.value("restune", PARAMS_WITHOUT_HEAD) == 500_000
    assert table.value("restune", PARAMS_WITH_HEAD) == pytest.approx(538_706.333, abs=1e-3)


def test_markdown(runs: list[Path]) -> None:
    text = sweep_table(collect(runs), GROUPS).to_markdown()
    lines = text.splitlines()
    assert lines[0] == f"Protocol `final`: {FINAL}. Accuracies in %."
    assert lines[2] == (
        "| preset | cifar | dtd | kitti | Natural | Structured | mean (tasks) | mean (groups) "
        "| params without head | params with head (mean over tasks) | protocol |"
    )
    assert lines[3] == "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    assert lines[4] == "| restune | 70.00 | 80.50 | 60.25 | 75.25 | 60.25 | 70.25 | 67.75 | 500,000 | 538,706 | final |"
    assert lines[5] == "| linear | 60.00 | 70.00 | 50.00 | 65.00 | 50.00 | 60.00 | 57.50 | 0 | 38,706 | final |"
    # Missing kitti: the cell and every mean show a dash rather than a mean over two tasks.
    assert lines[6] == "| lora | 71.50 | 79.00 | — | — | — | — | — | 294,912 | — | final |"
    assert len(lines) == 7


def test_csv(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "tables" / "final.csv"
    assert sweep_table(collect(runs), GROUPS).to_csv(out) == out
    with open(out, newline="") as file:
        records = list(csv.DictReader(file))
    assert [r["preset"] for r in records] == ["restune", "linear", "lora"]
    restune, linear, lora = records
    assert float(restune["Natural"]) == 75.25 and float(restune["Structured"]) == 60.25
    assert float(restune[MEAN_TASKS]) == 70.25 and float(restune[MEAN_GROUPS]) == 67.75
    assert float(linear[MEAN_GROUPS]) == 57.5
    assert restune[PARAMS_WITHOUT_HEAD] == "500000" and linear[PARAMS_WITHOUT_HEAD] == "0"
    assert float(restune[PARAMS_WITH_HEAD]) == pytest.approx(538_706.333, abs=1e-3)
    assert lora["kitti"] == "" and lora[MEAN_TASKS] == "" and lora[MEAN_GROUPS] == "" and lora["protocol"] == "final"
    assert [p.name for p in out.parent.iterdir()] == ["final.csv"]  # no temporary file left behind


def test_without_full_group_mapping_no_group_columns(runs: list[Path]) -> None:
    for groups in (None, {"cifar": "natural", "dtd": "natural"}):
        table = sweep_table(collect(runs), groups)
        assert MEAN_GROUPS not in table.columns and "Natural" not in table.columns
        assert table.value("restune", MEAN_TASKS) == 70.25


def test_non_vtab_tasks_keep_first_seen_order() -> None:
    rows = [
        {"preset": "a", "task": "zebra", "protocol": "val", "metric": "m", "accuracy": 1.0},
        {"preset": "a", "task": "apple", "protocol": "val", "metric": "m", "accuracy": 2.0},
        {"preset": "b", "task": "apple", "protocol": "val", "metric": "m", "accuracy": 3.0},
    ]
    table = sweep_table(rows)
    assert table.tasks == ("zebra", "apple") and table.presets == ("a", "b")
    assert table.value("a", MEAN_TASKS) == 1.5 and table.value("b", MEAN_TASKS) is None
    assert table.value("a", PARAMS_WITHOUT_HEAD) is None  # not given: shown as a dash, not as 0


def test_mixed_protocols_rejected(tmp_path: Path) -> None:
    rows = collect([write_run(tmp_path, "restune", "dtd", 80.0), write_run(tmp_path, "restune", "cifar", 70.0)])
    rows.append(read_summary(write_run(tmp_path, "linear", "dtd", 70.0, protocol="paper", metric=PAPER)))
    with pytest.raises(ValueError, match="mix protocols"):
        sweep_table(rows)


def test_val_metric_suffixes_share_one_label() -> None:
    base = "test accuracy at the last epoch, hyper-parameters chosen on val200"
    rows = [
        {"preset": "a", "task": "dtd", "protocol": "val", "metric": f"{base}; chosen lr0.001", "accuracy": 1.0},
        {"preset": "a", "task": "cifar", "protocol": "val", "metric": f"{base}; chosen lr0.01", "accuracy": 2.0},
    ]
    table = sweep_table(rows)
    assert table.metric.startswith(f"{base}; settings chosen per run")
    rows[1]["metric"] = FINAL
    with pytest.raises(ValueError, match="mix metric labels"):
        sweep_table(rows)


def test_duplicate_cell_and_bad_group_rejected(tmp_path: Path) -> None:
    row = read_summary(write_run(tmp_path, "restune", "dtd", 80.0))
    with pytest.raises(ValueError, match="two runs"):
        sweep_table([row, dict(row)])
    with pytest.raises(ValueError, match="group"):
        sweep_table([row], {"dtd": "textures"})
    with pytest.raises(ValueError, match="no runs"):
        sweep_table([])


def test_missing_summary_names_folder(tmp_path: Path) -> None:
    good = write_run(tmp_path, "restune", "dtd", 80.0)
    unfinished = tmp_path / "unfinished-run"
    unfinished.mkdir()
    with pytest.raises(FileNotFoundError, match="unfinished-run"):
        collect([good, unfinished])


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left behind


def test_plot_curves(runs: list[Path], tmp_path: Path) -> None:
    no_eval = write_run(tmp_path, "lora", "kitti", 55.0, eval_points=False)
    out = plot_curves([*runs[:2], no_eval], tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    assert_png(out)
    # Only runs without evaluation points: the accuracy panel carries a note instead of failing.
    assert_png(plot_curves([no_eval], tmp_path / "plots" / "no_eval.png"))


def test_plot_accuracy_vs_params(runs: list[Path], tmp_path: Path) -> None:
    rows = collect(runs)
    out = plot_accuracy_vs_params(rows, tmp_path / "plots" / "params.png")
    assert out == tmp_path / "plots" / "params.png"
    assert_png(out)
    assert_png(plot_accuracy_vs_params(rows, tmp_path / "plots" / "params_head.png", with_head=True))
