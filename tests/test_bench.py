"""Smoke runs of the benchmarks on a tiny ViT: they run, compare peers and write tables and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from restune.bench.configs import CONFIGS
from restune.bench.run import BenchSettings, format_table, memory, multitask, speed
from restune.cli import main

TINY = {"model": "vit_tiny_patch16_224", "img_size": 32, "num_classes": 10, "batch_size": 2, "repeats": 1}


def test_speed_runs_every_configuration() -> None:
    rows = speed(BenchSettings(**TINY, device="cpu"), progress=False)
    assert [r["config"] for r in rows] == list(CONFIGS)
    assert all(r["step_s"] > 0 for r in rows)
    by_name = {r["config"]: r["trainable"] for r in rows}
    assert by_name["peft_lora"] == by_name["lora"]  # r = 8 on the fused qkv vs split q, v: the same count
    assert by_name["floor_inference"] == 0
    table = format_table("speed", rows)
    assert "x peft LoRA" in table and "| Bypass from cache |" in table


def test_memory_measures_in_fresh_processes() -> None:
    rows = memory(BenchSettings(**TINY, device="cpu", configs=("bypass", "peft_lora")), progress=False)
    assert [r["config"] for r in rows] == ["bypass", "peft_lora"]
    assert all(r["peak_mib"] > 0 for r in rows)
    assert "1.000 |" in format_table("memory", rows)


def test_multitask_compares_one_pass_with_adapter_switching() -> None:
    rows = multitask(BenchSettings(**TINY, device="cpu"), tasks=(1, 2), progress=False)
    assert [r["tasks"] for r in rows] == [1, 2]
    assert all(r["speedup"] > 0 for r in rows)
    assert "| 2 |" in format_table("multitask", rows)


def test_cli_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "speed",
        "--model",
        "vit_tiny_patch16_224",
        "--img-size",
        "32",
        "--batch-size",
        "2",
        "--repeats",
        "1",
        "--configs",
        "bypass",
        "floor_features",
        "--device",
        "cpu",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert [r["config"] for r in data["speed"]["rows"]] == ["bypass", "floor_features"]
    assert "no-grad fwd+features" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown configuration"):
        main(["bench", "speed", "--configs", "nope"])


def test_merge_latency_compares_merged_plain_and_unmerged() -> None:
    from restune.bench.run import merge_latency

    rows = merge_latency(BenchSettings(**TINY, device="cpu"), presets=("lora", "ssf"), progress=False)
    assert [r["preset"] for r in rows] == ["lora", "ssf"]
    assert all(r["merged_s"] > 0 and r["unmerged_s"] > 0 for r in rows)
    assert "merged / plain" in format_table("merge", rows)
