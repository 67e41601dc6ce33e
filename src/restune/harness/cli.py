"""``restune train``, ``eval``, ``sweep`` and ``plot``: timm-style flag groups, ``-c config.yaml``, ``key=value``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from restune.harness import run_files
from restune.harness.config import FLAG_GROUPS, TrainConfig, apply_overrides, load_yaml

__all__ = ["add_commands", "run_command", "COMMANDS"]

COMMANDS = ("train", "eval", "sweep", "plot")


def _flag_type(hint: Any) -> type:
    """The scalar type of an annotation such as ``int | None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _add_run_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags of ``train`` or ``sweep``, one per TrainConfig field that ``command`` takes, from the field metadata.

    ``--kebab-case`` of the field name, the type of its annotation, its group, help and choices. Every default is None
    so the YAML file and the recipe show through: a bool is ``--name`` (store_true), or ``--no-name`` (store_false)
    when the field defaults to True, as ``--no-progress`` does.
    """
    hints = typing.get_type_hints(TrainConfig)
    groups = {name: parser.add_argument_group(name) for name in FLAG_GROUPS}
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        if command not in meta["commands"]:
            continue
        flag, group, kind = "--" + field.name.replace("_", "-"), groups[meta["group"]], _flag_type(hints[field.name])
        if kind is bool:
            negated = field.default is True
            action = "store_false" if negated else "store_true"
            flag = f"--no-{flag[2:]}" if negated else flag
            group.add_argument(flag, dest=field.name, action=action, default=None, help=meta["help"])
        else:
            group.add_argument(flag, type=kind, choices=meta["choices"], default=None, help=meta["help"])
    parser.add_argument("-c", "--config", help="YAML file of settings (flag names, dashes or underscores)")
    parser.add_argument("overrides", nargs="*", help="key=value settings applied last, e.g. lr=0.01")


def add_commands(commands: Any) -> None:
    """Add the harness's subcommands to the ``restune`` parser."""
    p_train = commands.add_parser("train", help="train one tuner on one task")
    _add_run_flags(p_train, "train")
    p_eval = commands.add_parser("eval", help="evaluate a finished run on a split")
    p_eval.add_argument("run", type=Path, help="a run folder written by restune train")
    p_eval.add_argument("--split", default="test", help="train800, val200, train800val200 or test")
    p_eval.add_argument("--data-dir", help="default: the run's")
    p_eval.add_argument("--device", default="auto")
    p_sweep = commands.add_parser("sweep", help="tasks x presets under one protocol, as one table")
    p_sweep.add_argument("--tasks", nargs="+", required=True, help="task folder names inside --data-dir")
    p_sweep.add_argument("--presets", nargs="+", required=True)
    p_sweep.add_argument("--grid", nargs="+", default=[], help="with --protocol val: e.g. lr=1e-3,1e-2")
    _add_run_flags(p_sweep, "sweep")
    p_plot = commands.add_parser("plot", help="training curves and accuracy against trainable parameters (PNG)")
    p_plot.add_argument("runs", nargs="+", type=Path, help="run folders or sweep folders")
    p_plot.add_argument("--output", type=Path, required=True, help="folder for the PNG files")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < ``-c`` file < flags < ``key=value``, as one validated TrainConfig."""
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    names = set(TrainConfig.__dataclass_fields__)
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return TrainConfig(**apply_overrides(values, args.overrides))


def _run_folders(paths: list[Path]) -> list[Path]:
    found = run_files.find_runs(paths)
    if not found:
        raise SystemExit(f"restune plot: no run folder (with {run_files.SUMMARY}) in {', '.join(map(str, paths))}")
    return found


def evaluate_run(run: Path, split: str, data_dir: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Rebuild a run's model from its record, load its tuners and score a split."""
    import torch

    import restune
    from restune.atomic import atomic_write_text
    from restune.harness import distributed
    from restune.harness.build import build_backbone, open_split, transforms_for
    from restune.harness.config import resolved_recipe
    from restune.harness.loop import evaluate

    record, tuners = run / run_files.CONFIG, run / run_files.TUNERS
    if not record.is_file() or not tuners.is_dir():
        raise SystemExit(f"restune eval: {run} is not a finished run (needs {record.name} and {tuners.name}/)")
    config = TrainConfig(**yaml.safe_load(record.read_text())["run"])
    if data_dir:
        config.data_dir = data_dir
    recipe = resolved_recipe(config)
    context = distributed.setup(device)
    num_classes = open_split(config, config.train_split).num_classes
    torch.manual_seed(config.seed)  # a randomly initialised backbone is rebuilt as the run built it
    # The checkpoint's kind decides what load builds on the plain backbone: its tuners, or a new Bypass.
    model = restune.load(build_backbone(config, num_classes, recipe), tuners).to(context.device)
    dataset = open_split(config, split, transforms_for(model, recipe)[1], num_classes=num_classes)
    accuracy = evaluate(model, dataset, context, 64, amp=False)
    result = {"run": str(run), "split": split, "accuracy": accuracy, "images": len(dataset)}
    atomic_write_text(run / run_files.eval_name(split), json.dumps(result, indent=2) + "\n")
    return result


def run_command(args: argparse.Namespace) -> int:
    """Dispatch one harness subcommand; errors in the user's input exit with their message."""
    try:
        return _dispatch(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"restune {args.command}: {error}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        from restune.harness.loop import train

        row = train(config_from_args(args))
        print(f"{row['task']} / {row['preset']}: {row['accuracy']:.2f}% ({row['metric']})")
        return 0
    if args.command == "eval":
        result = evaluate_run(args.run, args.split, args.data_dir, args.device)
        print(f"{result['run']} on {result['split']}: {result['accuracy']:.2f}% of {result['images']} images")
        return 0
    if args.command == "sweep":
        from restune.harness.sweep import parse_grid, sweep

        args.dataset, args.tuner, args.resume = None, None, None
        base = config_from_args(args)
        folder = sweep(base, args.tasks, args.presets, args.output or "sweep", grid=parse_grid(args.grid))
        print((folder / run_files.SWEEP_TABLE).read_text())
        return 0
    from restune.harness.plots import plot_accuracy_vs_params, plot_curves
    from restune.harness.tables import collect

    runs = _run_folders(args.runs)
    args.output.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(runs, args.output / "curves.png")
    scatter = plot_accuracy_vs_params(collect(runs), args.output / "accuracy_vs_params.png")
    print(f"wrote {curves} and {scatter}")
    return 0
