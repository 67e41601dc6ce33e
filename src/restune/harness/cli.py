"""``restune train``, ``eval``, ``sweep`` and ``plot``: timm-style flag groups, ``-c config.yaml``, ``key=value``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from restune.harness.config import PROTOCOLS, TrainConfig, apply_overrides, load_yaml
from restune.harness.recipes import RECIPES

__all__ = ["add_commands", "run_command", "COMMANDS"]

COMMANDS = ("train", "eval", "sweep", "plot")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags shared by ``train`` and ``sweep``; every default is None so the YAML file and recipe show through."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="timm model name (default restune_vit_tiny, shipped pretrained)")
    model.add_argument("--pretrained-file", help="local .safetensors/.pth (timm file overlay) or Google .npz weights")
    model.add_argument("--img-size", type=int, help="input size, when not the model's default")
    model.add_argument("--random-init", action="store_true", default=None, help="ignore shipped weights (baseline)")
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", help="folder holding the task folders (VTAB-1k lists or ImageFolder trees)")
    data.add_argument("--num-classes", type=int, help="head size, checked against the labels (default: inferred)")
    data.add_argument("--normalization", choices=["imagenet", "model", "none"], help="default: the recipe's")
    data.add_argument("--num-workers", type=int, help="data loader worker processes (default 0)")
    training = parser.add_argument_group("training")
    training.add_argument("--recipe", choices=RECIPES, help="default (FacT/NOAH) or paper (the method's own code)")
    training.add_argument("--protocol", choices=PROTOCOLS, help="final (default), paper or val")
    training.add_argument("--epochs", type=int)
    training.add_argument("--batch-size", type=int, help="global batch size (split over processes)")
    training.add_argument("--lr", type=float)
    training.add_argument("--weight-decay", type=float)
    training.add_argument("--warmup-epochs", type=int)
    training.add_argument("--drop-path", type=float, help="backbone stochastic depth (default: the recipe's)")
    training.add_argument("--seed", type=int)
    training.add_argument("--amp", action="store_true", default=None, help="bf16 autocast on GPU")
    training.add_argument("--grad-accum", type=int, help="batches per optimizer step")
    training.add_argument("--bypass-cache", action="store_true", default=None, help="train a Bypass from features")
    training.add_argument("--device", help="auto (default), cpu or cuda")
    out = parser.add_argument_group("output")
    out.add_argument("--output", help="run folder (sweep: the sweep folder)")
    out.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    parser.add_argument("-c", "--config", help="YAML file of settings (flag names, dashes or underscores)")
    parser.add_argument("overrides", nargs="*", help="key=value settings applied last, e.g. lr=0.01")


def add_commands(commands: Any) -> None:
    """Add the harness's subcommands to the ``restune`` parser."""
    p_train = commands.add_parser("train", help="train one tuner on one task")
    p_train.add_argument("--tuner", help="preset, bypass preset or YAML spec (default res_tuning)")
    p_train.add_argument("--dataset", help="task folder name inside --data-dir")
    p_train.add_argument("--resume", action="store_true", default=None, help="continue the run in --output")
    _add_run_flags(p_train)
    p_eval = commands.add_parser("eval", help="evaluate a finished run on a split")
    p_eval.add_argument("run", type=Path, help="a run folder written by restune train")
    p_eval.add_argument("--split", default="test", help="train800, val200, train800val200 or test")
    p_eval.add_argument("--data-dir", help="default: the run's")
    p_eval.add_argument("--device", default="auto")
    p_sweep = commands.add_parser("sweep", help="tasks x presets under one protocol, as one table")
    p_sweep.add_argument("--tasks", nargs="+", required=True, help="task folder names inside --data-dir")
    p_sweep.add_argument("--presets", nargs="+", required=True)
    p_sweep.add_argument("--grid", nargs="+", default=[], help="with --protocol val: e.g. lr=1e-3,1e-2")
    _add_run_flags(p_sweep)
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
    found = []
    for path in paths:
        if (path / "summary.csv").is_file():
            found.append(path)
        else:
            found += sorted(p.parent for p in path.glob("runs/**/summary.csv"))
    if not found:
        raise SystemExit(f"restune plot: no run folder (with summary.csv) in {', '.join(map(str, paths))}")
    return found


def evaluate_run(run: Path, split: str, data_dir: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Rebuild a run's model from its record, load its tuners and score a split."""
    import torch

    import restune
    from restune.bypass import Bypass
    from restune.harness import distributed
    from restune.harness.build import build_model, open_split, transforms_for
    from restune.harness.config import resolved_recipe
    from restune.harness.loop import atomic_write_text, evaluate

    record = run / "config.yaml"
    if not record.is_file() or not (run / "tuners").is_dir():
        raise SystemExit(f"restune eval: {run} is not a finished run (needs config.yaml and tuners/)")
    config = TrainConfig(**yaml.safe_load(record.read_text())["run"])
    if data_dir:
        config.data_dir = data_dir
    recipe = resolved_recipe(config)
    context = distributed.setup(device)
    num_classes = open_split(config, config.train_split).num_classes
    torch.manual_seed(config.seed)  # a randomly initialised backbone is rebuilt as the run built it
    model = build_model(config, num_classes, recipe)
    model = restune.load(model.backbone if isinstance(model, Bypass) else model, run / "tuners").to(context.device)
    dataset = open_split(config, split, transforms_for(model, recipe)[1], num_classes=num_classes)
    accuracy = evaluate(model, dataset, context, 64, amp=False)
    result = {"run": str(run), "split": split, "accuracy": accuracy, "images": len(dataset)}
    atomic_write_text(run / f"eval-{split}.json", json.dumps(result, indent=2) + "\n")
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
        print((folder / "sweep.md").read_text())
        return 0
    from restune.harness.plots import plot_accuracy_vs_params, plot_curves
    from restune.harness.tables import collect

    runs = _run_folders(args.runs)
    args.output.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(runs, args.output / "curves.png")
    scatter = plot_accuracy_vs_params(collect(runs), args.output / "accuracy_vs_params.png")
    print(f"wrote {curves} and {scatter}")
    return 0
