"""The training harness end to end on tiny VTAB-format folders: train, eval, sweep, plot, resume, DDP, errors.

The model is timm's ``test_vit`` at 32 px (4 patches), randomly initialised: these tests check the harness, not
accuracy (the shipped pretrained backbone's accuracy tests live in test_demo.py).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_images, make_vit
from vtab_folders import make_imagefolder_task, make_vtab_task

import restune
from restune.cli import main
from restune.harness.config import TrainConfig, apply_overrides, load_yaml, resolved_recipe
from restune.harness.loop import lr_at
from restune.harness.recipes import Recipe, recipe_for
from restune.harness.sweep import parse_grid

SIZES = {"train800": 16, "val200": 8, "test": 12}
BASE = ["--model", "test_vit", "--img-size", "32", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vtab")
    make_vtab_task(root, "shapes", num_classes=3, sizes=SIZES, image_size=16, seed=1)
    make_vtab_task(root, "colours", num_classes=4, sizes=SIZES, image_size=16, seed=2)
    return root


def run_train(data: Path, output: Path, *extra: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init warning of a model without shipped weights
        return main(["train", *BASE, "--data-dir", str(data), "--dataset", "shapes", "--output", str(output), *extra])


def summary(run: Path) -> dict[str, str]:
    with (run / "summary.csv").open() as handle:
        return next(csv.DictReader(handle))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------------------------
# train and eval
# --------------------------------------------------------------------------------------------------------------------


def test_train_writes_the_run_folder_and_eval_reproduces_it(data: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert run_train(data, run, "--tuner", "lora", "--epochs", "2") == 0
    assert {p.name for p in run.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "summary.csv",
        "train_state.pt",
        "tuners",
    }
    row = summary(run)
    assert row["protocol"] == "final" and row["metric"] == "test accuracy at the last epoch"
    assert row["task"] == "shapes" and row["preset"] == "lora" and row["epochs"] == "2"
    assert int(row["trainable"]) == int(row["trainable_without_head"]) + int(row["head"])
    assert int(row["head"]) == 65 * 3 and int(row["test_images"]) == 12
    assert not any(key in row for key in ("seconds", "output", "data_dir"))  # no timings or paths in summary.csv
    lines = metrics(run)
    assert [m["epoch"] for m in lines] == [1, 2] and lines[0]["eval_acc"] is None
    assert lines[-1]["eval_split"] == "test" and lines[-1]["seconds"] > 0
    assert float(row["accuracy"]) == pytest.approx(lines[-1]["eval_acc"])
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["run"]["tuner"] == "lora" and recorded["recipe"]["lr"] == 1e-3
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "test"]) == 0
    assert f"{float(row['accuracy']):.2f}%" in capsys.readouterr().out
    assert json.loads((run / "eval-test.json").read_text())["accuracy"] == pytest.approx(float(row["accuracy"]))


def test_paper_protocol_reports_the_max_over_the_cadence(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_train(data, run, "--tuner", "arc", "--recipe", "paper", "--protocol", "paper", "--epochs", "3") == 0
    row, lines = summary(run), metrics(run)
    evaluated = [m["eval_acc"] for m in lines]
    assert None not in evaluated  # ARC's code evaluates every epoch
    assert float(row["accuracy"]) == pytest.approx(max(evaluated))
    assert "test-selected, as in the official code" in row["metric"] and row["recipe"].startswith("paper (ARC")


def test_val_protocol_trains_on_train800_and_scores_val200(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_train(data, run, "--tuner", "linear", "--protocol", "val", "--epochs", "1") == 0
    row = summary(run)
    assert row["protocol"] == "val" and "val200" in row["metric"] and row["test_images"] == "8"


def test_bypass_trains_from_a_feature_cache(data: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert run_train(data, run, "--tuner", "res_tuning_bypass", "--bypass-cache", "--epochs", "2") == 0
    assert "extracting features" not in capfd.readouterr().err  # --no-progress silences the extraction bar too
    assert (run / "cache" / "train800val200" / "cache.json").is_file()
    assert summary(run)["preset"] == "res_tuning_bypass"
    assert main(["eval", str(run), "--split", "test"]) == 0


def test_a_relabelled_list_rebuilds_the_feature_cache(tmp_path: Path) -> None:
    root = tmp_path / "vtab"
    make_vtab_task(root, "shapes", num_classes=3, sizes=SIZES, image_size=16, seed=1)
    run = tmp_path / "run"
    assert run_train(root, run, "--tuner", "res_tuning_bypass", "--bypass-cache", "--epochs", "1") == 0
    stored = run / "cache" / "train800val200" / "labels.bin"
    before = torch.from_file(str(stored), size=len(stored.read_bytes()) // 8, dtype=torch.int64)
    listing = root / "shapes" / "train800val200.txt"
    lines = [line.rsplit(" ", 1) for line in listing.read_text().splitlines()]
    listing.write_text("".join(f"{path} {(int(label) + 1) % 3}\n" for path, label in lines))  # same images, new labels
    assert run_train(root, run, "--tuner", "res_tuning_bypass", "--bypass-cache", "--epochs", "1", "--resume") == 0
    after = torch.from_file(str(stored), size=len(before), dtype=torch.int64)
    assert torch.equal(after, (before + 1) % 3)


def test_yaml_config_flags_and_overrides_in_that_order(data: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("lr: 0.5\nepochs: 7\nweight-decay: 0.25\n")
    run = tmp_path / "run"
    assert run_train(data, run, "-c", str(config), "--tuner", "bitfit", "--epochs", "1", "lr=0.01") == 0
    recipe = yaml.safe_load((run / "config.yaml").read_text())["recipe"]
    assert (recipe["lr"], recipe["epochs"], recipe["weight_decay"]) == (0.01, 1, 0.25)


# --------------------------------------------------------------------------------------------------------------------
# resume after a kill
# --------------------------------------------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-W", "ignore", "-m", "restune.cli", *args]


def test_resume_after_kill_finishes_with_the_uninterrupted_summary(data: Path, tmp_path: Path) -> None:
    args = [*BASE, "--data-dir", str(data), "--dataset", "shapes", "--tuner", "res_adapter", "--epochs", "12"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli("train", *args, "--output", str(straight)), check=True, env=env, capture_output=True)
    process = subprocess.Popen(_cli("train", *args, "--output", str(killed)), env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "metrics.jsonl").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "summary.csv").exists()
    assert len(metrics(killed)) < 12
    resumed = subprocess.run(_cli("train", *args, "--output", str(killed), "--resume"), env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert (killed / "summary.csv").read_text() == (straight / "summary.csv").read_text()
    assert [m["train_loss"] for m in metrics(killed)] == [m["train_loss"] for m in metrics(straight)]


def test_an_existing_run_is_never_overwritten(data: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert run_train(data, run, "--tuner", "linear", "--epochs", "1") == 0
    before = (run / "summary.csv").read_text()
    assert run_train(data, run, "--tuner", "linear", "--epochs", "1") == 2
    assert "pass --resume" in capsys.readouterr().err
    assert run_train(data, run, "--tuner", "linear", "--epochs", "2", "--resume") == 2
    assert "epochs: 1 -> 2" in capsys.readouterr().err
    assert (run / "summary.csv").read_text() == before


# --------------------------------------------------------------------------------------------------------------------
# torchrun DDP on CPU (gloo)
# --------------------------------------------------------------------------------------------------------------------


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(data: Path, tmp_path: Path) -> None:
    args = [
        *BASE,
        "--data-dir",
        str(data),
        "--dataset",
        "shapes",
        "--tuner",
        "lora",
        "--epochs",
        "2",
        "--drop-path",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli("train", *args, "--output", str(one)), check=True, env=env, capture_output=True)
    torchrun = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*torchrun, "-m", "restune.cli", "train", *args, "--output", str(two)], env=env, capture_output=True
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    # The same samples form each global batch and DDP averages the two halves' gradients: equal up to float
    # reassociation (stated tolerance 1e-5 on the weights, 1e-4 on the losses).
    a = torch.load(one / "train_state.pt", weights_only=True)["trainable"]
    b = torch.load(two / "train_state.pt", weights_only=True)["trainable"]
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    losses = zip([m["train_loss"] for m in metrics(one)], [m["train_loss"] for m in metrics(two)], strict=True)
    assert all(abs(x - y) < 1e-4 for x, y in losses)
    assert summary(one)["accuracy"] == summary(two)["accuracy"]


# --------------------------------------------------------------------------------------------------------------------
# sweep and plot
# --------------------------------------------------------------------------------------------------------------------


def test_sweep_writes_one_table_and_plot_draws_it(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", *BASE, "--data-dir", str(data), "--tasks", "shapes", "colours", "--presets", "linear", "lora"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*argv, "--epochs", "1", "--output", str(out)]) == 0
    table = (out / "sweep.md").read_text()
    assert "| linear |" in table and "| lora |" in table and "shapes" in table and "colours" in table
    with (out / "sweep.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2
    assert main(["plot", str(out), "--output", str(tmp_path / "plots")]) == 0
    for name in ("curves.png", "accuracy_vs_params.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_val_sweep_selects_on_val200_then_retrains(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", *BASE, "--data-dir", str(data), "--tasks", "shapes", "--presets", "linear", "--protocol", "val"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*argv, "--epochs", "1", "--grid", "lr=1e-3,1e-1", "--output", str(out)]) == 0
    assert len(list((out / "select" / "shapes" / "linear").iterdir())) == 2
    row = summary(out / "runs" / "shapes" / "linear")
    assert row["protocol"] == "val" and "chosen on val200" in row["metric"] and row["test_images"] == "12"


# --------------------------------------------------------------------------------------------------------------------
# configuration, recipes and errors
# --------------------------------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_cosine_cooldown() -> None:
    recipe = Recipe(lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, epochs=100, warmup_epochs=10)
    assert lr_at(recipe, 0) == pytest.approx(1e-6)
    assert lr_at(recipe, 5) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at(recipe, 10) == pytest.approx(1e-3)
    assert lr_at(recipe, 55) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(recipe, 100) == lr_at(recipe, 105) == 1e-5


def test_recipes() -> None:
    assert recipe_for("default", "full", "cifar").lr == 1e-4
    rlrr = recipe_for("paper", "rlrr", "dtd")
    assert (rlrr.lr, rlrr.weight_decay, rlrr.hflip, rlrr.zero_head) == (2e-3, 5e-5, True, True)
    assert rlrr.cooldown_epochs == 10 and rlrr.schedule_per == "epoch" and rlrr.normalization == "model"
    snell = recipe_for("paper", "snell", "dmlab")
    assert (snell.batch_size, snell.weight_decay, snell.epochs) == (8, 1e-4, 100)
    arc = recipe_for("paper", "arc", "cifar")
    assert (arc.lr, arc.weight_decay, arc.clip_grad) == (1e-2, 0.0, 1.0)
    assert recipe_for("paper", "lora", "cifar").lr == 1e-3
    short = resolved_recipe(TrainConfig(dataset="cifar", tuner="lora", epochs=5))
    assert short.warmup_epochs == 0
    with pytest.raises(ValueError, match="warmup_epochs"):
        resolved_recipe(TrainConfig(dataset="cifar", tuner="lora", epochs=5, warmup_epochs=5))


def test_config_errors_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="did you mean 'lr'"):
        apply_overrides({}, ["lrr=1"])
    with pytest.raises(ValueError, match="not key=value"):
        apply_overrides({}, ["lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n")
    with pytest.raises(ValueError, match="did you mean 'epochs'"):
        load_yaml(bad)
    with pytest.raises(ValueError, match="protocol"):
        TrainConfig(protocol="best")
    with pytest.raises(ValueError, match="grid entry"):
        parse_grid(["momentum=0.9"])


def test_bad_data_exits_with_the_file_and_line(data: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    make_vtab_task(broken, "shapes", num_classes=3, sizes=SIZES, image_size=16, seed=1)
    lines = (broken / "shapes" / "train800val200.txt").read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + " 9"
    (broken / "shapes" / "train800val200.txt").write_text("\n".join(lines) + "\n")
    assert run_train(broken, tmp_path / "run", "--tuner", "linear", "--epochs", "1", "num_classes=3") == 2
    err = capsys.readouterr().err
    assert "train800val200.txt" in err and "line 3" in err
    assert run_train(broken, tmp_path / "run2", "--tuner", "lora", "--dataset", "nope", "--epochs", "1") == 2
    assert "nope" in capsys.readouterr().err
    assert run_train(data, tmp_path / "run3", "--tuner", "lora", "--bypass-cache", "--epochs", "1") == 2
    assert "not a bypass tuner" in capsys.readouterr().err


@pytest.mark.parametrize("preset", [*restune.presets(), "res_tuning_bypass"])
def test_every_trainable_tensor_is_used_so_ddp_needs_no_unused_parameter_search(preset: str) -> None:
    # DDP (find_unused_parameters=False, the fast default) fails when a trainable tensor gets no gradient.
    model = make_vit(0)
    model = (
        restune.Bypass(model, preset, num_classes=5) if preset == "res_tuning_bypass" else restune.tune(model, preset)
    )
    model.train()
    model(make_images(3, batch=2)).logsumexp(-1).sum().backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


def test_imagefolder_trees_train_like_vtab_folders(tmp_path: Path) -> None:
    make_imagefolder_task(tmp_path / "fgvc", "birds", num_classes=3, seed=4)
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        argv = ["train", *BASE, "--data-dir", str(tmp_path / "fgvc"), "--dataset", "birds", "--output", str(run)]
        assert main([*argv, "--tuner", "lora", "--epochs", "1"]) == 0
    row = summary(run)
    assert row["num_classes"] == "3" and int(row["test_images"]) > 0
