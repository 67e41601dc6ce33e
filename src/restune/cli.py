"""The ``restune`` command: ``info``, ``demo``, ``suite``, ``bench``, and the harness's ``train|eval|sweep|plot``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import timm
import torch

import restune
from restune.atomic import atomic_write_text
from restune.contract import get_tuner, tuner_names
from restune.harness.cli import COMMANDS, add_commands, run_command
from restune.report import Report, report
from restune.tune import backbone_parameters

__all__ = ["main", "HANDLERS"]


def _meta_model(name: str, num_classes: int) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=num_classes)


def info(model_name: str, num_classes: int) -> str:
    """Tuner types and presets with their trainable counts on a timm model built on the meta device."""
    try:
        base = _meta_model(model_name, num_classes)
    except RuntimeError as err:
        raise SystemExit(f"restune info: cannot build timm model {model_name!r}: {err}") from None
    total = sum(p.numel() for p in base.parameters())
    lines = [f"restune {restune.__version__} on {model_name} ({total:,} parameters, {num_classes} classes)", ""]
    lines += ["| tuner type | binding | binds to |", "|---|---|---|"]
    for name in tuner_names():
        module_cls = get_tuner(name).module_cls
        lines.append(f"| {name} | {module_cls.binding.value} | {', '.join(sorted(module_cls.site_kinds))} |")
    lines += ["", "| preset | tuners | trainable without head | + VTAB-1k avg head | + FGVC avg head | % of backbone |"]
    lines.append("|---|---|---:|---:|---:|---:|")
    backbone = sum(p.numel() for p in backbone_parameters(base).values())

    def row(preset: str, tuners: str, counts: Report) -> str:
        share = 100.0 * counts.trainable_without_head / backbone
        return (
            f"| {preset} | {tuners} | {counts.trainable_without_head:,} | {counts.with_vtab_head:,} | "
            f"{counts.with_fgvc_head:,} | {share:.3f}% |"
        )

    for preset in restune.presets(kind=None):  # both kinds, built alike
        spec = restune.resolve(preset)
        built = restune.build(_meta_model(model_name, num_classes), spec, num_classes=num_classes)
        lines.append(row(preset, spec.describe(), report(built)))
    return "\n".join(lines)


def _parser() -> tuple[argparse.ArgumentParser, set[str]]:
    """The parser and the names of its subcommands (which ``main`` checks against :data:`HANDLERS`)."""
    parser = argparse.ArgumentParser(prog="restune", description="Res-Tuning and related tuners for timm ViTs")
    parser.add_argument("--version", action="version", version=f"restune {restune.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    p_info = commands.add_parser("info", help="list tuners and presets with their trainable counts")
    p_info.add_argument("--model", default="vit_base_patch16_224", help="timm model name (built on the meta device)")
    p_info.add_argument("--num-classes", type=int, default=100, help="classes of the concrete head")
    p_demo = commands.add_parser("demo", help="adapt the shipped pretrained ViT to an offline task (a few minutes)")
    p_demo.add_argument("--output", default="restune-demo", help="folder for the data, runs, table and chart")
    p_demo.add_argument("--task", default=None, help="a task of the offline suite (default: remote)")
    p_demo.add_argument("--epochs", type=int, default=5)
    p_demo.add_argument("--seed", type=int, default=0)
    p_suite = commands.add_parser("suite", help="write the offline VTAB-style suite in the VTAB-1k folder format")
    p_suite.add_argument("--output", default="restune-suite", help="folder to write the task folders into")
    p_suite.add_argument("--tasks", nargs="+", default=None, help="tasks to write (default: all)")
    p_suite.add_argument("--seed", type=int, default=0)
    p_suite.add_argument("--test-size", type=int, default=500, help="test images per task")
    p_bench = commands.add_parser("bench", help="memory, speed, multi-task and merge benchmarks against peers")
    p_bench.add_argument("what", choices=["memory", "speed", "multitask", "merge", "all"])
    p_bench.add_argument("--model", default="vit_base_patch16_224", help="timm model (randomly initialised)")
    p_bench.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    p_bench.add_argument("--num-classes", type=int, default=100)
    p_bench.add_argument("--batch-size", type=int, default=None, help="default 32 (memory, speed), 16 (multitask)")
    p_bench.add_argument("--repeats", type=int, default=3, help="timings are the minimum over this many repeats")
    p_bench.add_argument("--configs", nargs="+", default=None, help="configurations to compare (default: all)")
    p_bench.add_argument("--tasks", type=int, nargs="+", default=[1, 5, 19], help="task counts for multitask")
    p_bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p_bench.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    add_commands(commands)
    return parser, set(commands.choices)


def bench(args: argparse.Namespace) -> int:
    """Run the requested benchmarks, print Markdown tables, optionally write JSON."""
    from restune.bench.configs import CONFIGS
    from restune.bench.run import BenchSettings, format_table, memory, merge_latency, multitask, speed

    unknown = sorted(set(args.configs or []) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"restune bench: unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    base = {"model": args.model, "num_classes": args.num_classes, "img_size": args.img_size, "repeats": args.repeats}
    if args.device:
        base["device"] = args.device
    if args.configs:
        base["configs"] = tuple(args.configs)
    results = {}
    for what in ("memory", "speed", "multitask", "merge") if args.what == "all" else (args.what,):
        batch = args.batch_size or (16 if what == "multitask" else 32)
        settings = BenchSettings(**base, batch_size=batch)
        if what == "multitask":
            rows = multitask(settings, tuple(args.tasks))
        elif what == "merge":
            rows = merge_latency(settings)
        else:
            rows = memory(settings) if what == "memory" else speed(settings)
        results[what] = {"settings": {**settings.__dict__}, "rows": rows}
        print(f"\n## {what} ({settings.model}, batch {batch}, {settings.device})\n")
        print(format_table(what, rows))
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2, default=str) + "\n")
    return 0


def _info(args: argparse.Namespace) -> int:
    print(info(args.model, args.num_classes))
    return 0


def _suite(args: argparse.Namespace) -> int:
    from restune.suite import TASKS, write_suite

    unknown = sorted(set(args.tasks or []) - set(TASKS))
    if unknown:
        raise SystemExit(f"restune suite: unknown task(s) {unknown}; the suite has {', '.join(TASKS)}")
    written = write_suite(args.output, tasks=args.tasks, seed=args.seed, test_size=args.test_size)
    print("\n".join(f"{name}: {folder}" for name, folder in written.items()))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from restune.demo import DEMO_TASK, main_demo
    from restune.suite import TASKS

    task = args.task or DEMO_TASK
    if task not in TASKS:
        raise SystemExit(f"restune demo: unknown task {task!r}; the offline suite has {', '.join(TASKS)}")
    return main_demo(args.output, task=task, epochs=args.epochs, seed=args.seed)


#: Every subcommand and the function that runs it; ``main`` checks the parser offers exactly these.
HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "info": _info,
    "demo": _demo,
    "suite": _suite,
    "bench": bench,
    **dict.fromkeys(COMMANDS, run_command),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``restune`` console script."""
    parser, names = _parser()
    unhandled = names ^ set(HANDLERS)
    if unhandled:  # a subcommand added to the parser but not to HANDLERS (or the reverse) is a bug, not a fallback
        raise SystemExit(f"restune: commands without both a parser and a handler: {', '.join(sorted(unhandled))}")
    args = parser.parse_args(argv)  # an unknown command exits here (status 2) with argparse's list of choices
    return HANDLERS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
