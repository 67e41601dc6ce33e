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
