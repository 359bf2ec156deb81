"""The command line's grammar: every command, its flags and their help (``sslbench.cli`` runs them)."""

from __future__ import annotations

import argparse
from typing import Any

from sslbench.config import PRESETS


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _add_run_arguments(command: argparse.ArgumentParser, with_methods: bool = True) -> None:
    """The options ``run`` and ``ablate`` share: what to train on, and any config key."""
    if with_methods:
        command.add_argument(
            "--methods", type=_csv, help="comma-separated, e.g. dino,byol, or all (default: the preset's)"
        )
    command.add_argument("--arch", dest="archs", type=_csv, help="comma-separated, e.g. resnet50,vit_s16")
    command.add_argument(
        "--dataset",
        help="embedded (default, offline), cifar10, cifar100, stl10, tinyimagenet, imagenet100, imagenet, "
        "or imagefolder:PATH",
    )
    command.add_argument("--data-root", help="where the dataset lives (a zip, an ImageFolder tree, ...)")
    command.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="let torchvision download CIFAR-10 (needs network)",
    )
    command.add_argument("--preset", default="quick", help=f"one of {', '.join(PRESETS)} (default: quick)")
    command.add_argument("--config", help="a YAML file of config keys, applied over the preset")
    command.add_argument(
        "--recipe",
        choices=["shared", "paper"],
        help="shared: one schedule for every method (fair, the default); paper: each method's "
        "published optimizer recipe",
    )
    command.add_argument("--epochs", type=int)
    command.add_argument("--batch-size", type=int)
    _add_evaluation_arguments(command)
    command.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    command.add_argument(
        "--augment-on",
        choices=["cpu", "gpu"],
        help="where the view recipes run: cpu (PIL, in loader workers; default) or gpu (the whole batch "
        "on the training device)",
    )
    command.add_argument(
        "--compile", action="store_true", default=None, help="torch.compile the backbones (long GPU runs)"
    )
    command.add_argument("--out", help="the run folder (default: results/<date>-<preset>)")
    command.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. train.lr=1e-3 or dino.teacher_temp=0.07 (repeatable)",
    )
    command.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py",
        help="load methods from a local file (repeatable)",
    )
    command.add_argument("--no-progress", action="store_true", help="no progress bar")
    command.add_argument(
        "--log",
        dest="trackers",
        type=_csv,
        help="mirror metrics, config and results into trackers, offline: tensorboard, mlflow, wandb",
    )
    restart = command.add_mutually_exclusive_group()
    restart.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out where it stopped (same config): finished pairs are kept, the "
        "others go on from their newest checkpoint",
    )
    restart.add_argument(
        "--force", action="store_true", help="delete what the run in --out holds and start it over"
    )


def _seeds(text: str) -> list[int]:
    try:
        return [int(item) for item in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 0,1,2; got '{text}'"
        ) from None


def _add_evaluation_arguments(command: argparse.ArgumentParser) -> None:
    """Seeds, image size and the evaluation dataset: shared by run, ablate and eval."""
    command.add_argument("--seed", type=int)
    command.add_argument(
        "--seeds", type=_seeds, help="repeat every pair with each seed, e.g. 0,1,2: tables show mean ± std"
    )
    command.add_argument(
        "--image-size", type=int, help="the size images are resized to (default: the dataset's own)"
    )
    command.add_argument(
        "--eval-dataset",
        help="evaluate on another dataset than the one trained on (transfer), e.g. cifar100",
    )
    command.add_argument("--eval-data-root", help="where the evaluation dataset lives")


class _Parser(argparse.ArgumentParser):
    """No abbreviated options, for the command and (as the class subcommands are made of) every
    subcommand: the command printed to resume a run must mean what the user typed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)


def _add_eval_command(commands: Any) -> None:
    """``sslbench eval``: weights files evaluated as a run's pairs are."""
    evaluate = commands.add_parser(
        "eval", help="evaluate networks trained elsewhere (or here) from their weights, as run does"
    )
    evaluate.add_argument(
        "weights",
        nargs="+",
        help="weights files (sslbench, DINO, MoCo v3, iBOT, DINOv2, torchvision, timm, solo-learn, lightly; "
        "recognised from their keys) or timm:<model_name> from the local cache",
    )
    evaluate.add_argument("--arch", dest="archs", type=_csv, required=True, help="the network, e.g. vit_s16")
    evaluate.add_argument("--name", help="the row's name (default: from the file)")
    evaluate.add_argument("--part", help="which network of a training checkpoint: teacher, student, ...")
    evaluate.add_argument(
        "--allow-partial",
        action="store_true",
        help="load although keys are missing or unexpected (listed, and recorded in the protocol)",
    )
    for flag, text in (
        ("--dataset", "the evaluation dataset: embedded (default), cifar10, cifar100, stl10, ..."),
        ("--data-root", "where the dataset lives"),
        ("--config", "a YAML file of config keys, applied over the preset"),
        ("--device", "auto (default), cpu, cuda or cuda:N"),
        ("--out", "the run folder (default: results/<date>-<preset>)"),
    ):
        evaluate.add_argument(flag, help=text)
    evaluate.add_argument("--preset", default="quick", help=f"one of {', '.join(PRESETS)} (default: quick)")
    _add_evaluation_arguments(evaluate)
    evaluate.add_argument(
        "--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE", help="any eval.* key"
    )
    evaluate.add_argument("--no-progress", action="store_true", help="no per-file lines")
    evaluate.add_argument("--force", action="store_true", help="start the run in --out over")


def _add_export_command(commands: Any) -> None:
    """``sslbench export``: a run's evaluated network for timm or torchvision."""
    export = commands.add_parser("export", help="write a run's evaluated network for timm or torchvision")
    export.add_argument("run", help="a run folder, e.g. results/20260101-120000-quick")
    export.add_argument("--pair", help="which pair, e.g. dino-vit_s16 (needed when the run has several)")
    export.add_argument(
        "--format", dest="fmt", choices=["timm", "torchvision", "safetensors"], default="timm"
    )
    export.add_argument("--out", help="the folder to write (default: RUN/export/<pair>-<format>/)")
    export.add_argument("--overwrite", action="store_true", help="replace files an earlier export wrote")


# ``submit``'s own flags (everything else it takes is ``run``'s, passed to the job unchanged). Defaults
# follow the DINO reference's run_with_submitit.py: 2800 minutes, 10 CPUs a task, 120 s of warning.
JOB_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--cluster", {"choices": ["slurm", "local"], "default": "slurm",
                   "help": "slurm (default), or local: the job on this machine (submitit's local executor)"}),
    ("--nodes", {"type": int, "default": 1, "help": "nodes (default 1)"}),
    ("--gpus-per-node", {"type": int, "default": 1, "help": "GPUs per node (default 1; 0 for a CPU job)"}),
    ("--tasks-per-node", {"type": int, "help": "processes per node (default: one per GPU, at least one)"}),
    ("--cpus-per-task", {"type": int, "default": 10, "help": "CPUs per process (default 10)"}),
    ("--mem-gb", {"type": float, "help": "memory per node in GB (default 40 per GPU)"}),
    ("--partition", {"help": "the Slurm partition"}),
    ("--time", {"default": "2800", "help": "time limit: minutes or [D-]HH:MM[:SS] (default 2800)"}),
    ("--account", {"help": "the Slurm account to charge"}),
    ("--qos", {"help": "the Slurm quality of service"}),
    ("--constraint", {"help": "a Slurm node constraint, e.g. volta32gb"}),
    ("--job-name", {"help": "the job's name (default sslbench)"}),
    ("--signal-delay-s", {"type": int, "default": 120,
                          "help": "seconds before the time limit to checkpoint and requeue (default 120)"}),
    ("--wait", {"action": "store_true", "help": "wait for the job to end, then print its table"}),
)  # fmt: skip


def _add_submit_command(commands: Any) -> None:
    submit = commands.add_parser(
        "submit",
        help="run as one Slurm job (submitit): nodes x GPUs, requeued with --resume on preemption/time-out",
    )
    _add_run_arguments(submit)
    job = submit.add_argument_group("the job")
    for name, spec in JOB_OPTIONS:
        job.add_argument(name, **spec)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sslbench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train and evaluate methods x archs, then write the tables")
    _add_run_arguments(run)
    _add_submit_command(commands)

    ablate = commands.add_parser(
        "ablate", help="train variants of one method under one schedule; ablation table"
    )
    ablate.add_argument("method", help="the method to ablate; dino has the DINO paper's table built in")
    ablate.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a config key and its values, one variant each (repeatable), e.g. dino.teacher_temp=0.04,0.07",
    )
    _add_run_arguments(ablate, with_methods=False)

    _add_eval_command(commands)
    _add_export_command(commands)

    attention = commands.add_parser("attention", help="class-token attention maps of a run's ViT pairs (PNG)")
    attention.add_argument("run", help="a run folder, e.g. results/20260101-120000-quick")
    attention.add_argument(
        "--images", nargs="+", default=[], help="image files (default: the run's test split)"
    )
    attention.add_argument(
        "--masks", nargs="+", default=[], help="object masks, one per image: Jaccard scores"
    )
    attention.add_argument("--out", help="where to write the PNGs (default: RUN/attention/)")
    attention.add_argument(
        "--mass", type=float, default=0.6, help="attention mass the mask keeps (default 0.6)"
    )

    listing = commands.add_parser("list", help="methods (and where each came from), archs, datasets, presets")
    listing.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py",
        help="list the methods of a local file too",
    )

    report = commands.add_parser("report", help="rebuild or merge tables from saved run folders")
    report.add_argument("runs", nargs="+", help="run folders, e.g. results/20260101-120000-quick")
    report.add_argument("--out", help="where to write the merged tables (default: the first run folder)")
    return parser
