"""Smoke tests of the command line: the README's main job and `restune info`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from restune.cli import main

SCRIPT = Path(sys.executable).with_name("restune")


def test_readme_main_job_runs_and_prints_the_table() -> None:
    """`restune demo`, exactly as the README's first block runs it."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run([str(SCRIPT), "demo"], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "preset" not in line]
    assert [row.split("|")[1].strip() for row in rows] == [
        "res_tuning",
        "res_adapter",
        "res_prefix",
        "res_prompt",
        "res_lora",
        "res_attn",
        "lora",
    ]
    for row in rows:
        first, last = (float(cell) for cell in row.split("|")[5:7])
        assert last < first, row  # every preset learns something on the synthetic task
    assert "placeholder" in done.stdout


def test_info_lists_presets_with_spec_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "| res_tuning | res_prefix + res_adapter | 378,000 | 416,045 | 558,407 |" in out
    assert "| lora | lora | 294,912 | 332,957 | 475,319 |" in out
    for tuner in ("res_adapter", "res_prefix", "res_prompt", "res_lora", "res_attn", "lora"):
        assert f"| {tuner} |" in out


def test_info_on_another_width(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "vit_small_patch16_224", "--num-classes", "10"]) == 0
    assert "| res_adapter | res_adapter | 96,900 |" in capsys.readouterr().out


def test_unknown_model_and_preset_fail_clearly() -> None:
    with pytest.raises(SystemExit, match="cannot build timm model|Unknown model"):
        main(["info", "--model", "not_a_model"])
    with pytest.raises(SystemExit, match="unknown preset"):
        main(["demo", "--presets", "nope"])
