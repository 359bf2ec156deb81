"""Command line: ``sslbench run | list | report``.

A user-facing error (``SSLBenchError``) prints one message and exits with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sslbench.backbones import ARCHS
from sslbench.config import PRESETS, load_preset, load_yaml, parse_set, preset_text, resolve_config
from sslbench.datasets import DATASET_CHOICES
from sslbench.errors import SSLBenchError
from sslbench.registry import list_methods, load_plugin_file


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslbench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train and evaluate methods x archs, then write the tables")
    run.add_argument("--methods", type=_csv, help="comma-separated, e.g. dino,byol (default: the preset's)")
    run.add_argument("--arch", dest="archs", type=_csv, help="comma-separated, e.g. resnet50,vit_s16")
    run.add_argument("--dataset", help="embedded (default, offline), cifar10, or imagefolder:PATH")
    run.add_argument("--data-root", help="where the dataset lives (a zip, an ImageFolder tree, ...)")
    run.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="let torchvision download CIFAR-10 (needs network)",
    )
    run.add_argument("--preset", default="quick", help=f"one of {', '.join(PRESETS)} (default: quick)")
    run.add_argument("--config", help="a YAML file of config keys, applied over the preset")
    run.add_argument(
        "--recipe",
        choices=["shared", "paper"],
        help="shared: one schedule for every method (fair, the default); paper: each method's "
        "published optimizer recipe",
    )
    run.add_argument("--epochs", type=int)
    run.add_argument("--batch-size", type=int)
    run.add_argument("--seed", type=int)
    run.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    run.add_argument("--out", help="the run folder (default: results/<date>-<preset>)")
    run.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. train.lr=1e-3 or dino.teacher_temp=0.07 (repeatable)",
    )
    run.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py",
        help="load methods from a local file (repeatable)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    commands.add_parser("list", help="methods (and where each came from), archs, datasets, presets")

    report = commands.add_parser("report", help="rebuild or merge tables from saved run folders")
    report.add_argument("runs", nargs="+", help="run folders, e.g. results/20260101-120000-quick")
    report.add_argument("--out", help="where to write the merged tables (default: the first run folder)")
    return parser


def _flag_layer(args: argparse.Namespace) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for key in ("methods", "archs", "dataset", "data_root", "download", "recipe", "seed", "device", "out"):
        if getattr(args, key) is not None:
            layer[key] = getattr(args, key)
    train = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size)) if v is not None}
    if train:
        layer["train"] = train
    return layer


def command_run(args: argparse.Namespace) -> int:
    from sslbench.experiment import run_benchmark

    for plugin in args.plugin:
        load_plugin_file(plugin)
    layers = [load_preset(args.preset), {"preset": args.preset}]
    if args.config:
        layers.append(load_yaml(args.config))
    layers.append(_flag_layer(args))
    layers += [parse_set(assignment) for assignment in args.assignments]
    config = resolve_config(layers, list(list_methods()))
    started = time.perf_counter()
    outcome = run_benchmark(config, show_progress=not args.no_progress)
    from sslbench.report import format_table_text

    print(format_table_text(outcome.results))
    print(f"\nwrote {outcome.out_dir} in {time.perf_counter() - started:.0f} s")
    if outcome.failed:
        print(f"{len(outcome.failed)} pair(s) failed:\n  " + "\n  ".join(outcome.failed), file=sys.stderr)
        return 1
    return 0


def command_list() -> int:
    print("methods:")
    for name, source in list_methods().items():
        print(f"  {name:<12} {source}")
    print("archs:")
    for name, spec in ARCHS.items():
        print(f"  {name:<12} {spec.description} (timm {spec.timm_name})")
    print("datasets:")
    for name in DATASET_CHOICES:
        print(f"  {name}")
    print("presets:")
    for name in PRESETS:
        print(f"  {name:<12} {preset_text(name).splitlines()[0].lstrip('# ')}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from sslbench.report import format_table_text, load_results, write_report

    results = load_results(args.runs)
    out_dir = Path(args.out) if args.out else Path(args.runs[0])
    write_report(results, out_dir)
    print(format_table_text(results))
    print(f"\nwrote {out_dir}")
    return 0


def _format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A warning for a user reads like an error: one line, no source file and line."""
    return f"sslbench: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _format_warning
    try:
        if args.command == "run":
            return command_run(args)
        if args.command == "list":
            return command_list()
        return command_report(args)
    except SSLBenchError as error:
        print(f"sslbench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sslbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
