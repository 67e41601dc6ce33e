"""``restune bench memory | speed | multitask``: peers side by side in one run, reported as ratios.

Memory on CPU follows one protocol so numbers compare across machines: a fresh subprocess per configuration with
``MALLOC_MMAP_THRESHOLD_=131072`` (large buffers go back to the OS when freed), RSS recorded after the imports, the
model and optimizer built, one warm-up step, the kernel's peak-RSS mark reset (``/proc/self/clear_refs`` = 5), one
measured step, and the peak (VmHWM) minus the after-import RSS reported. On a GPU: ``max_memory_allocated``.
Times are the minimum over repeats with the configurations interleaved, so drift hits all of them alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from restune.bench.configs import CONFIGS, build, make_backbone
from restune.optional import require

__all__ = ["BenchSettings", "memory", "speed", "multitask", "merge_latency", "format_table"]

PEFT = ("peft", "peft", "restune bench (its peer: peft LoRA)")  # (module, extra, purpose) for optional.require


@dataclass
class BenchSettings:
    """What every benchmark shares."""

    model: str = "vit_base_patch16_224"
    num_classes: int = 100
    img_size: int | None = None
    batch_size: int = 32
    repeats: int = 3
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    configs: tuple[str, ...] = tuple(CONFIGS)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.img_size or 224
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(self.batch_size, 3, size, size, generator=generator)
        labels = torch.randint(self.num_classes, (self.batch_size,), generator=generator)
        return images.to(self.device), labels.to(self.device)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_here(settings: BenchSettings, name: str) -> dict[str, Any]:
    """One configuration's peak step memory in this process (the worker side of ``memory``)."""
    require(*PEFT)  # imported before the baseline, as every configuration pays for it
    import timm  # noqa: F401

    device = torch.device(settings.device)
    baseline = _status_kib("VmRSS") if device.type == "cpu" else 0
    runner = build(name, make_backbone(settings.model, settings.num_classes, settings.img_size, device))
    images, labels = settings.batch()
    runner.step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        runner.step(images, labels)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")
        runner.step(images, labels)
        peak = (_status_kib("VmHWM") - baseline) / 1024
    return {"config": name, "label": runner.name, "trainable": runner.trainable, "peak_mib": peak}


def memory(settings: BenchSettings, progress: bool = True) -> list[dict[str, Any]]:
    """Peak step memory of each configuration, each in a fresh subprocess."""
    require(*PEFT)  # here, rather than as a traceback from the first worker
    results = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "TQDM_DISABLE": "1"}
    for name in tqdm(settings.configs, desc="memory", disable=not progress):
        args = json.dumps({**settings.__dict__, "configs": [name]})
        command = [sys.executable, "-m", "restune.bench.run", args]
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory benchmark of {name!r} failed:\n{done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def speed(settings: BenchSettings, progress: bool = True) -> list[dict[str, Any]]:
    """Step time of each configuration: minimum over interleaved repeats, after one warm-up step each."""
    device = torch.device(settings.device)
    images, labels = settings.batch()
    runners = {}
    for name in settings.configs:
        runners[name] = build(name, make_backbone(settings.model, settings.num_classes, settings.img_size, device))
        runners[name].step(images, labels)
    best = {name: float("inf") for name in runners}
    for _ in tqdm(range(settings.repeats), desc="speed repeats", disable=not progress):
        for name, runner in runners.items():
            _sync(device)
            start = time.perf_counter()
            runner.step(images, labels)
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return [{"config": n, "label": r.name, "trainable": r.trainable, "step_s": best[n]} for n, r in runners.items()]


def multitask(settings: BenchSettings, tasks: tuple[int, ...] = (1, 5, 19), progress: bool = True) -> list[dict]:
    """N tasks on one batch: one MultiTask pass against N peft-LoRA passes switched with ``set_adapter``."""
    import restune

    peft = require(*PEFT)

    device = torch.device(settings.device)
    images, _ = settings.batch()
    results = []
    for count in tqdm(tasks, desc="multitask", disable=not progress):
        backbone = make_backbone(settings.model, settings.num_classes, settings.img_size, device).eval()
        multi = restune.MultiTask(
            backbone, {f"t{i}": restune.Bypass(backbone, num_classes=settings.num_classes) for i in range(count)}
        )
        peft_model = make_backbone(settings.model, settings.num_classes, settings.img_size, device)
        config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"])
        peft_model = peft.get_peft_model(peft_model, config, adapter_name="t0").eval()
        for i in range(1, count):
            peft_model.add_adapter(f"t{i}", config)

        def run_peft(peft_model: Any = peft_model, count: int = count) -> None:
            with torch.inference_mode():
                for i in range(count):
                    peft_model.set_adapter(f"t{i}")
                    peft_model(images)

        timings = {}
        for label, run in (("restune MultiTask", lambda multi=multi: multi(images)), ("peft set_adapter", run_peft)):
            run()
            best = float("inf")
            for _ in range(settings.repeats):
                _sync(device)
                start = time.perf_counter()
                run()
                _sync(device)
                best = min(best, time.perf_counter() - start)
            timings[label] = best
        results.append(
            {"tasks": count, **timings, "speedup": timings["peft set_adapter"] / timings["restune MultiTask"]}
        )
    return results


MERGE_PRESETS = ("lora", "res_lora", "ssf", "rlrr", "arc", "hta", "snell")


def merge_latency(settings: BenchSettings, presets: tuple[str, ...] = MERGE_PRESETS, progress: bool = True) -> list:
    """Inference latency of each merged model against the plain backbone and the unmerged tuned model."""
    import restune

    device = torch.device(settings.device)
    images, _ = settings.batch()
    chosen = [p for p in presets if p in restune.presets()]
    plain = make_backbone(settings.model, settings.num_classes, settings.img_size, device).eval()
    runs: dict[str, Any] = {"plain": plain}
    for preset in chosen:
        tuned = restune.tune(make_backbone(settings.model, settings.num_classes, settings.img_size, device), preset)
        merged = restune.tune(make_backbone(settings.model, settings.num_classes, settings.img_size, device), preset)
        merged.load_state_dict(tuned.state_dict())
        restune.merge(merged)
        runs[f"{preset}:unmerged"], runs[f"{preset}:merged"] = tuned.eval(), merged.eval()
    best = {name: float("inf") for name in runs}
    with torch.inference_mode():
        for model in runs.values():
            model(images)
        for _ in tqdm(range(settings.repeats), desc="merge repeats", disable=not progress):
            for name, model in runs.items():
                _sync(device)
                start = time.perf_counter()
                model(images)
                _sync(device)
                best[name] = min(best[name], time.perf_counter() - start)
    return [
        {
            "preset": p,
            "plain_s": best["plain"],
            "merged_s": best[f"{p}:merged"],
            "unmerged_s": best[f"{p}:unmerged"],
            "merged_vs_plain": best[f"{p}:merged"] / best["plain"],
            "unmerged_vs_plain": best[f"{p}:unmerged"] / best["plain"],
        }
        for p in chosen
    ]


def format_table(kind: str, rows: list[dict[str, Any]]) -> str:
    """A Markdown table with ratios against full fine-tuning, peft LoRA and the floors, where measured."""
    if kind == "merge":
        lines = [
            "| preset | plain (s) | merged (s) | unmerged (s) | merged / plain | unmerged / plain |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['preset']} | {r['plain_s']:.3f} | {r['merged_s']:.3f} | {r['unmerged_s']:.3f} | "
            f"{r['merged_vs_plain']:.3f} | {r['unmerged_vs_plain']:.3f} |"
            for r in rows
        ]
        return "\n".join(lines)
    if kind == "multitask":
        lines = ["| tasks | restune MultiTask (s) | peft set_adapter (s) | speed-up |", "|---:|---:|---:|---:|"]
        lines += [
            f"| {r['tasks']} | {r['restune MultiTask']:.3f} | {r['peft set_adapter']:.3f} | {r['speedup']:.1f}x |"
            for r in rows
        ]
        return "\n".join(lines)
    value, unit = ("peak_mib", "MiB") if kind == "memory" else ("step_s", "s")
    by_name = {r["config"]: r[value] for r in rows}
    peers = [
        (k, label)
        for k, label in (
            ("full", "full FT"),
            ("peft_lora", "peft LoRA"),
            ("floor_features", "no-grad fwd+features"),
            ("floor_inference", "inference fwd"),
        )
        if k in by_name
    ]
    header = f"| configuration | trainable | {kind} ({unit}) | " + " | ".join(f"x {p}" for _, p in peers) + " |"
    lines = [header, "|---|---:|---:|" + "---:|" * len(peers)]
    for r in rows:
        ratios = " | ".join(f"{r[value] / by_name[k]:.3f}" if by_name[k] > 0 else "-" for k, _ in peers)
        lines.append(f"| {r['label']} | {r['trainable']:,} | {r[value]:.3f} | {ratios} |")
    return "\n".join(lines)


def main() -> None:
    """Worker entry: measure one configuration's memory and print it as one JSON line."""
    data = json.loads(sys.argv[1])
    data["configs"] = tuple(data["configs"])
    settings = BenchSettings(**data)
    print(json.dumps(measure_memory_here(settings, settings.configs[0])))


if __name__ == "__main__":
    main()
