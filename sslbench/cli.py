"""Command line: ``sslbench run | submit | ablate | eval | export | attention | list | report``.

A user-facing error (``SSLBenchError``) prints one message and exits with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import textwrap
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sslbench.base.errors import SSLBenchError
from sslbench.cli_parser import build_parser
from sslbench.config import PRESETS, RunConfig, load_preset, load_yaml, parse_set, preset_text, resolve_config
from sslbench.data.datasets import DATASET_CHOICES
from sslbench.method.registry import get_method, list_methods, load_plugin_file
from sslbench.models.backbones import ARCHS
from sslbench.training.distributed import shutdown_distributed
from sslbench.training.interrupt import RunInterrupted

if TYPE_CHECKING:
    from sslbench.training.experiment import PairTime, RunOutcome


def _flag_layer(args: argparse.Namespace) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    top_level = (
        "methods",
        "archs",
        "dataset",
        "data_root",
        "download",
        "recipe",
        "seed",
        "seeds",
        "device",
        "out",
    )
    for key in (*top_level, "image_size", "trackers"):
        if getattr(args, key, None) is not None:
            layer[key] = getattr(args, key)
    evaluation = {"dataset": args.eval_dataset, "data_root": args.eval_data_root}
    if any(value is not None for value in evaluation.values()):
        layer["eval"] = {key: value for key, value in evaluation.items() if value is not None}
    train_flags = (
        ("epochs", getattr(args, "epochs", None)),
        ("batch_size", getattr(args, "batch_size", None)),
        ("augment_on", getattr(args, "augment_on", None)),
        ("compile", getattr(args, "compile", None)),
    )
    train = {key: value for key, value in train_flags if value is not None}
    if train:
        layer["train"] = train
    return layer


def _resolve_run_config(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> RunConfig:
    for plugin in getattr(args, "plugin", []):
        load_plugin_file(plugin)
    layers = [load_preset(args.preset), {"preset": args.preset}]
    if args.config:
        layers.append(load_yaml(args.config))
    layers.append(_flag_layer(args) | (extra or {}))
    layers += [parse_set(assignment) for assignment in args.assignments]
    return resolve_config(layers, list(list_methods()))


def _restart(args: argparse.Namespace) -> str:
    """What to do with a results folder that already holds a run: refuse, resume it, or start over."""
    if (args.resume or args.force) and not args.out:
        raise SSLBenchError(f"--{'resume' if args.resume else 'force'} needs the run folder: add --out PATH")
    return "resume" if args.resume else "force" if args.force else "new"


def time_breakdown(timings: dict[str, PairTime], total: float) -> str:
    """Where a run's time went: training per pair, then evaluation, monitoring, checkpoints and logging
    over all pairs, and the rest of this session (loading data, building models, reports)."""
    if not timings:
        return f"time: {total:.0f} s, no pair trained in this session"
    training = []
    for pair, spent in timings.items():
        if spent.failed:
            training.append(f"{pair} failed after {spent.session_s:.0f} s")
        else:
            earlier = " (with earlier sessions)" if spent.resumed else ""
            training.append(f"{pair} {spent.parts['training']:.0f} s{earlier}")
    parts = [f"training {', '.join(training)}"]
    for part in ("evaluation", "monitoring", "checkpoints", "logging"):
        parts.append(f"{part} {sum(spent.parts[part] for spent in timings.values()):.0f} s")
    rest = total - sum(spent.session_s for spent in timings.values())
    parts.append(f"the rest {max(rest, 0.0):.0f} s (data, set-up, reports)")
    return f"time: {'; '.join(parts)}"


def _finish(outcome: RunOutcome, text: str, started: float) -> int:
    print(text)
    total = time.perf_counter() - started
    print(f"\nwrote {outcome.out_dir} in {total:.0f} s")
    print(time_breakdown(outcome.timings, total))
    if outcome.failed:
        print(f"{len(outcome.failed)} pair(s) failed:\n  " + "\n  ".join(outcome.failed), file=sys.stderr)
        return 1
    return 0


def command_run(args: argparse.Namespace) -> int:
    from sslbench.reporting.tables import format_table_text
    from sslbench.training.experiment import run_benchmark

    config = _resolve_run_config(args)
    started = time.perf_counter()
    outcome = run_benchmark(config, show_progress=not args.no_progress, restart=_restart(args))
    if not outcome.main:  # a helper rank of a distributed run: the main rank reports
        return 0
    return _finish(outcome, format_table_text(outcome.results), started)


def command_ablate(args: argparse.Namespace) -> int:
    from sslbench.training.ablation import ablation_table, variants_for, write_ablation_table
    from sslbench.training.experiment import run_benchmark

    config = _resolve_run_config(args, {"methods": [args.method]})
    variants = variants_for(args.method, config, args.vary)
    started = time.perf_counter()
    outcome = run_benchmark(
        config, show_progress=not args.no_progress, variants=variants, restart=_restart(args)
    )
    if not outcome.main:  # a helper rank of a distributed run: the main rank reports
        return 0
    table = ablation_table(outcome.results, variants)
    return _finish(
        outcome, write_ablation_table(table, outcome.results, outcome.out_dir, args.method), started
    )


def command_eval(args: argparse.Namespace) -> int:
    from sslbench.reporting.tables import format_table_text
    from sslbench.training.weights_eval import WeightsSpec, evaluate_weights

    if args.name and len(args.weights) > 1:
        raise SSLBenchError("--name names one file's row: give one weights file, or leave --name out")
    config = _resolve_run_config(args, {"methods": []})
    specs = [WeightsSpec(source, args.name, args.part, args.allow_partial) for source in args.weights]
    started = time.perf_counter()
    restart = "force" if args.force else "new"
    if args.force and not args.out:
        raise SSLBenchError("--force needs the run folder: add --out PATH")
    outcome = evaluate_weights(config, specs, restart, show_progress=not args.no_progress)
    return _finish(outcome, format_table_text(outcome.results), started)


def command_export(args: argparse.Namespace) -> int:
    from sslbench.training.export_run import export_pair

    out = Path(args.out) if args.out else None
    exported = export_pair(Path(args.run), args.pair, args.fmt, out, args.overwrite)
    print("wrote\n  " + "\n  ".join(str(path) for path in exported.files))
    print("load with:\n" + textwrap.indent(exported.load_code, "    "))
    print("\n".join(exported.notes[1:]))  # the first note is the recipe on one line
    return 0


def _command_submit(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from sslbench.cli_submit import command_submit  # imports this module: loaded when used

    return command_submit(args, argv)


def command_attention(args: argparse.Namespace) -> int:
    from sslbench.evaluation.attention import write_attention_report

    written = write_attention_report(args.run, args.out, args.images, args.masks, args.mass)
    print("wrote\n  " + "\n  ".join(str(path) for path in written))
    return 0


def command_list(args: argparse.Namespace) -> int:
    for plugin in args.plugin:
        load_plugin_file(plugin)
    print("methods:")
    for name, source in list_methods().items():
        paper = get_method(name).paper or "no paper given"
        print(f"  {name:<13} {paper}; {source}")
    print("archs:")
    for name, spec in ARCHS.items():
        print(f"  {name:<12} {spec.description} (timm {spec.timm_name})")
    print("datasets:")
    for name in DATASET_CHOICES:
        print(f"  {name}")
    print("presets:")
    for name in PRESETS:
        print(f"  {name:<15} {preset_text(name).splitlines()[0].lstrip('# ')}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from sslbench.reporting.plots import write_collapse_diagnostics, write_training_curves
    from sslbench.reporting.tables import format_table_text, load_results, write_report

    results = load_results(args.runs)
    out_dir = Path(args.out) if args.out else Path(args.runs[0])
    write_report(results, out_dir)
    if len(args.runs) == 1:  # training curves belong to one run; a merge has no single timeline
        write_training_curves(args.runs[0], out_dir)
        write_collapse_diagnostics(args.runs[0], out_dir)
    print(format_table_text(results))
    print(f"\nwrote {out_dir}")
    return 0


def _format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A warning for a user reads like an error: one line, no source file and line."""
    return f"sslbench: warning: {message}\n"


def launcher() -> list[str]:
    """How this process was started, for the command that resumes it: plain, or under torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return ["sslbench"]
    return ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')}", "-m", "sslbench"]


def resumed_argv(argv: Sequence[str], out_dir: Path) -> list[str]:
    """The arguments that continue a run: the same ones, ``--out`` the run's folder, ``--resume`` in place
    of ``--force``."""
    kept: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token in ("--resume", "--force"):
            continue
        if token == "--out":
            next(tokens, None)
            continue
        if not token.startswith("--out="):
            kept.append(token)
    return [*kept, "--out", str(out_dir), "--resume"]


def resume_command(argv: Sequence[str], out_dir: Path, prefix: Sequence[str] = ("sslbench",)) -> str:
    """The command that continues an interrupted run, as a shell line."""
    return shlex.join([*prefix, *resumed_argv(argv, out_dir)])


def _interrupted(
    stop: KeyboardInterrupt,
    argv: Sequence[str],
    resume_hint: str | None = None,
    requeue_signal: int | None = None,
) -> int:
    """What was kept, and the exact command that goes on from it (said once, by the main rank); in a job
    that requeues itself on ``requeue_signal``, that it does."""
    if not isinstance(stop, RunInterrupted) or stop.out_dir is None:  # before a run folder was made
        print("sslbench: interrupted", file=sys.stderr)
        return stop.exit_status if isinstance(stop, RunInterrupted) else 130
    if stop.main and stop.signum == requeue_signal:
        print(
            f"sslbench: interrupted: {stop.what}. Finished pairs are kept in {stop.out_dir}; the job "
            "requeues itself and goes on from the newest checkpoints",
            file=sys.stderr,
        )
    elif stop.main:
        prefix = launcher()
        nodes = " (and the same torchrun options for more than one node)" if prefix[0] == "torchrun" else ""
        command = resume_hint or resume_command(argv, stop.out_dir, prefix)
        print(
            f"sslbench: interrupted: {stop.what}. Finished pairs are kept in {stop.out_dir}; to go on from "
            f"the newest checkpoints{nodes if not resume_hint else ''}:\n  {command}",
            file=sys.stderr,
        )
    return stop.exit_status


def main(
    argv: Sequence[str] | None = None, resume_hint: str | None = None, requeue_signal: int | None = None
) -> int:
    """``sslbench ARGV``. In a submitted job, ``resume_hint`` replaces the resume command an interrupted
    run prints (``sslbench submit ... --resume``), and a stop on ``requeue_signal`` says the job requeues."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _format_warning
    try:
        commands = {
            "run": command_run,
            "ablate": command_ablate,
            "eval": command_eval,
            "export": command_export,
            "attention": command_attention,
            "submit": lambda args: _command_submit(args, argv),
        }
        if args.command in commands:
            try:
                return commands[args.command](args)
            finally:
                shutdown_distributed()
        if args.command == "list":
            return command_list(args)
        return command_report(args)
    except SSLBenchError as error:
        print(f"sslbench: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into a reader that stopped early (``sslbench list | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as stop:  # a run stopped on a signal says how to resume it
        return _interrupted(stop, argv, resume_hint, requeue_signal)


if __name__ == "__main__":
    sys.exit(main())
