"""Smoke tests of the command line: the README's main job and `restune info`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from restune.cli import main

SCRIPT = Path(sys.executable).with_name("restune")


METHOD_NAMES = [
    "linear probe",
    "LoRA",
    "RLRR",
    "Res-Tuning-Bypass",
    "Res-Tuning-Bypass + Res-Attn",
    "full fine-tuning (memory only)",
]


def test_readme_main_job_runs_and_prints_the_table(tmp_path: Path) -> None:
    """`restune demo` as the README's first block runs it, shortened to one epoch per method."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    command = [str(SCRIPT), "demo", "--epochs", "1", "--output", str(tmp_path / "demo")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "method" not in line]
    assert [row.split("|")[1].strip() for row in rows] == METHOD_NAMES
    saved = dict(zip(METHOD_NAMES, (float(row.split("|")[5].split()[0]) for row in rows), strict=True))
    # the bypass keeps the least for backward; full fine-tuning the most
    bypasses = max(saved["Res-Tuning-Bypass"], saved["Res-Tuning-Bypass + Res-Attn"])
    assert bypasses < min(saved["LoRA"], saved["RLRR"]) <= saved["full fine-tuning (memory only)"]
    assert (tmp_path / "demo" / "results.md").read_text().strip() in done.stdout
    assert (tmp_path / "demo" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_info_lists_presets_with_spec_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "| res_tuning | res_prefix + res_adapter | 378,000 | 416,045 | 558,407 |" in out
    assert "| lora | lora | 294,912 | 332,957 | 475,319 |" in out
    assert "| res_tuning_bypass | bypass: lateral res_adapter, vertical res_adapter | 1,198,848 | 1,236,893 |" in out
    assert "| res_tuning_bypass_attn | bypass: lateral res_attn, vertical res_adapter | 1,189,260 |" in out
    for tuner in ("res_adapter", "res_prefix", "res_prompt", "res_lora", "res_attn", "lora"):
        assert f"| {tuner} |" in out


def test_info_on_another_width(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "vit_small_patch16_224", "--num-classes", "10"]) == 0
    assert "| res_adapter | res_adapter | 96,900 |" in capsys.readouterr().out


def test_unknown_model_and_preset_fail_clearly() -> None:
    with pytest.raises(SystemExit, match="cannot build timm model|Unknown model"):
        main(["info", "--model", "not_a_model"])
    with pytest.raises(SystemExit, match="unknown task"):
        main(["demo", "--task", "nope"])


def test_every_subcommand_has_one_handler_and_an_unknown_command_fails(capsys: pytest.CaptureFixture[str]) -> None:
    from restune.cli import HANDLERS, _parser

    assert _parser()[1] == set(HANDLERS) == {"info", "demo", "suite", "bench", "train", "eval", "sweep", "plot"}
    with pytest.raises(SystemExit) as exited:
        main(["nope"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice" in error and "nope" in error


# The flags of `restune train` as they were written by hand before they were generated from TrainConfig's fields.
EVERY_TRAIN_FLAG = [
    "--model", "m", "--pretrained-file", "w.npz", "--img-size", "64", "--random-init", "--data-dir", "d",
    "--num-classes", "3", "--normalization", "none", "--num-workers", "2", "--recipe", "paper", "--protocol", "val",
    "--epochs", "2", "--batch-size", "8", "--lr", "1e-2", "--weight-decay", "0", "--warmup-epochs", "1",
    "--drop-path", "0.1", "--seed", "3", "--amp", "--grad-accum", "2", "--bypass-cache", "--device", "cpu",
    "--output", "o", "--no-progress", "--tuner", "lora", "--dataset", "t", "--resume",
]  # fmt: skip


def test_run_flags_come_from_the_config_fields_with_their_names_types_and_none_defaults() -> None:
    import dataclasses

    from restune.cli import _parser
    from restune.harness.cli import config_from_args
    from restune.harness.config import TrainConfig

    parser = _parser()[0]
    config = config_from_args(parser.parse_args(["train", *EVERY_TRAIN_FLAG]))
    assert config == TrainConfig(
        model="m", pretrained_file="w.npz", img_size=64, random_init=True, data_dir="d", num_classes=3,
        normalization="none", num_workers=2, recipe="paper", protocol="val", epochs=2, batch_size=8, lr=0.01,
        weight_decay=0.0, warmup_epochs=1, drop_path=0.1, seed=3, amp=True, grad_accum=2, bypass_cache=True,
        device="cpu", output="o", progress=False, tuner="lora", dataset="t", resume=True,
    )  # fmt: skip
    unset = vars(parser.parse_args(["train"]))  # every field has a flag, and it defaults to None so that -c files
    assert all(unset[f.name] is None for f in dataclasses.fields(TrainConfig))  # and recipes show through
    assert config_from_args(parser.parse_args(["train"])) == TrainConfig()
    sweep = vars(parser.parse_args(["sweep", "--tasks", "a", "--presets", "lora", "--no-progress", "--amp"]))
    assert sweep["progress"] is False and sweep["amp"] is True and not {"tuner", "dataset", "resume"} & set(sweep)
    for wrong in (["--recipe", "nope"], ["--epochs", "two"], ["--tuner", "lora"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["sweep", "--tasks", "a", "--presets", "lora", *wrong])
