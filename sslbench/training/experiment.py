"""A run: every (method, arch) pair through the one runner, then the report.

A failure in one pair is recorded in its eval.json and the others go on; every file is written
atomically, and the report is rebuilt from files alone.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from sslbench.base.atomic_io import write_json_atomic, write_text_atomic
from sslbench.base.collectives import is_main, on_main, world_size
from sslbench.base.errors import SSLBenchError
from sslbench.config import RunConfig, build_dataclass, config_to_dict, resolve_config
from sslbench.data.datasets import DatasetSplits, load_dataset
from sslbench.data.image_files import BadImageError, name_files, unreadable_images
from sslbench.evaluation.low_shot import parse_low_shot
from sslbench.method.registry import get_method, list_methods
from sslbench.models.backbones import ARCHS, arch_spec
from sslbench.reporting.plots import write_collapse_diagnostics, write_training_curves
from sslbench.reporting.tables import load_results, write_report
from sslbench.training.checkpoint import FOLDER as CHECKPOINT_FOLDER
from sslbench.training.distributed import init_distributed
from sslbench.training.environment import describe_environment
from sslbench.training.interrupt import RunInterrupted, agreed_stop, stop_on_signals
from sslbench.training.run_folder import RunLock, check_out_dir, prepare_out_dir
from sslbench.training.runner import PairPlan, plan_pair, training_source
from sslbench.training.tracked_pair import report_to_trackers, train_tracked
from sslbench.training.trackers import check_tracker_names


@dataclass
class RunOutcome:
    out_dir: Path
    results: pd.DataFrame
    failed: list[str]
    main: bool = True  # False on the helper ranks of a distributed run, which print nothing
    # Where the time went, by pair, for the pairs this session ran.
    timings: dict[str, PairTime] = field(default_factory=dict)


# Where a pair's time goes: eval.json keys, read by ``pair_time``.
PAIR_TIME_PARTS = ("training", "evaluation", "monitoring", "checkpoints", "logging")


@dataclass(frozen=True)
class PairTime:
    """A pair's seconds by part (``PAIR_TIME_PARTS``; a resumed pair's include its earlier sessions),
    and its wall time in this session."""

    parts: dict[str, float]
    session_s: float
    resumed: bool = False
    failed: bool = False


def pair_time(record: dict[str, Any]) -> PairTime:
    """From a pair's eval.json record; a failed pair has no training summary and no evaluation."""
    train = record.get("train") or {}
    seconds = (
        train.get("wall_s"), record.get("eval_s"), train.get("monitor_s"),
        train.get("checkpoint_s"), train.get("logging_s"),
    )  # fmt: skip
    parts = {part: float(value or 0.0) for part, value in zip(PAIR_TIME_PARTS, seconds, strict=True)}
    resumed, failed = train.get("resumed_at") is not None, record.get("status") != "ok"
    return PairTime(parts, float(record.get("total_wall_s") or 0.0), resumed, failed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SSLBenchError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N") from error
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise SSLBenchError(
            f"device '{name}' was requested but no CUDA GPU is available: use --device cpu or --device auto"
        )
    if (device.index or 0) >= torch.cuda.device_count():
        raise SSLBenchError(
            f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)"
        )
    return device


def check_batch_fits(plan: PairPlan, config: RunConfig, data: DatasetSplits) -> None:
    """A trainable pair needs at least one full batch of its training images, split evenly by rank."""
    if not plan.method_cls.trainable:
        return
    if plan.train.batch_size % world_size():
        raise SSLBenchError(
            f"batch size {plan.train.batch_size} (the global batch) does not divide among {world_size()} "
            "processes: use a multiple of the process count"
        )
    train = training_source(data, plan.train, config.seed, plan.method_cls.needs_labels)
    if plan.train.batch_size <= len(train):
        return
    unreadable = unreadable_images(train)  # a small set: the batch is larger than all of it
    readable = len(train) - len(unreadable)
    if unreadable and readable == 0:
        raise SSLBenchError(
            f"none of the {len(train)} training image(s) of {plan.folder_name} can be read: "
            f"{name_files(unreadable)}. Replace them, or point --dataset at the right folder"
        )
    if unreadable:
        skip = " (--set bad_images=skip leaves them out)" if config.bad_images != "skip" else ""
        raise SSLBenchError(
            f"batch size {plan.train.batch_size} is larger than the training set of {plan.folder_name}: "
            f"{len(train)} images, of which {len(unreadable)} cannot be read ({name_files(unreadable)}). "
            f"Replace or remove those{skip}, and lower --batch-size to {readable} or less"
        )
    raise SSLBenchError(
        f"batch size {plan.train.batch_size} is larger than the training set ({len(train)} images) of "
        f"{plan.folder_name}: lower --batch-size"
    )


class RunProgress:
    """One line per pair on stderr: which of how many, and the time the whole run has left, estimated
    from the pairs finished so far (each pair's own bar shows its steps)."""

    def __init__(self, total: int, show: bool) -> None:
        self.total, self.show = total, show
        self.position, self.durations = 0, []

    def skip(self, name: str, why: str = "finished before, kept") -> None:
        self.position += 1
        self._say(f"[{self.position}/{self.total}] {name}: {why}")

    def start(self, name: str) -> None:
        self.position += 1
        left = self.total - self.position + 1
        estimate = "estimate after the first pair"
        if self.durations:
            seconds = sum(self.durations) / len(self.durations) * left
            when = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
            estimate = f"about {when} left for the run ({left} pair(s) to go)"
        self._say(f"[{self.position}/{self.total}] {name}: {estimate}")

    def finish(self, seconds: float) -> None:
        self.durations.append(seconds)

    def _say(self, line: str) -> None:
        if self.show:
            tqdm.write(f"sslbench: {line}", file=sys.stderr)


NOT_APPLICABLE = "not applicable"
FAMILY_NAMES = {"resnet": "ResNets", "vit": "ViTs"}


def not_applicable(plan: PairPlan) -> str | None:
    """Why the pair's method cannot train its arch (a ViT-only method on a ResNet), or None."""
    family, families = arch_spec(plan.arch).family, plan.method_cls.families
    if family in families:
        return None
    trains = " and ".join(FAMILY_NAMES.get(f, f) for f in families)
    return f"{plan.method_cls.name} trains {trains} only, not {plan.arch}"


def finished_record(pair_dir: Path) -> dict | None:
    """A pair's eval.json if it finished ("ok"): a resumed run keeps it instead of training again."""
    path = pair_dir / "eval.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if record.get("status") == "ok" else None


# Keys a variant may not change: every variant of an ablation trains on the same data and pairs.
FIXED_ACROSS_VARIANTS = frozenset(
    {"dataset", "data_root", "image_size", "download", "methods", "archs", "out"}
)


@dataclass(frozen=True)
class Variant:
    """An ablation: a name and config overrides (``{"dino": {...}, "train": {...}}``) on top of the run's."""

    name: str
    overrides: dict


def check_run_request(config: RunConfig, restart: str) -> None:
    """What can be checked before any data loads: the names (methods, their options, archs, trackers)
    and the run folder, so a typo is refused at once (and before a job waits in a queue)."""
    if not config.methods:
        raise SSLBenchError(
            f"no method given: name at least one with --methods (valid: {', '.join(list_methods())})"
        )
    if not config.archs:
        raise SSLBenchError(f"no arch given: name at least one with --arch (valid: {', '.join(ARCHS)})")
    for name in config.methods:
        get_method(name)
    for name, options in config.method_options.items():  # a typo in any method's section is caught early
        build_dataclass(get_method(name).Config, options, name)
    for arch in config.archs:
        arch_spec(arch)
    check_tracker_names(config.trackers)
    check_out_dir(config.out, restart)


def run_benchmark(
    config: RunConfig,
    show_progress: bool = True,
    variants: Sequence[Variant] = (),
    restart: str = "new",
) -> RunOutcome:
    """Validate everything up front (names, options, data), then train and evaluate each pair.

    With ``variants``, every (method, arch) pair is run once per variant under the same schedule, each
    in its own folder ``<method>@<variant>-<arch>``. ``restart`` says what to do with a folder that
    holds a run: refuse ("new"), continue it ("resume": finished pairs are kept, the others continue
    from their newest checkpoint) or start it over ("force").
    """
    check_run_request(config, restart)
    methods = {name: get_method(name) for name in config.methods}
    device = init_distributed(resolve_device(config.device))  # this rank's device under torchrun
    data = load_dataset(
        config.dataset, config.data_root, config.image_size, config.download, bad_images=config.bad_images
    )
    eval_data = evaluation_data(config, data)
    variant_configs: list[tuple[str | None, RunConfig]] = [(None, config)]
    if variants:
        base = config_to_dict(config)
        variant_configs = [
            (v.name, resolve_config([base, v.overrides], list(list_methods()))) for v in variants
        ]
    for variant in variants:
        fixed = sorted(set(variant.overrides) & FIXED_ACROSS_VARIANTS)
        if fixed:
            raise SSLBenchError(
                f"variant '{variant.name}' changes {', '.join(fixed)}: variants of one ablation share the "
                "data and the pairs; vary method options, train.* or eval.* keys, or seed"
            )
    seeds = config.seeds or [config.seed]
    plans: list[tuple[PairPlan, RunConfig]] = []
    for name, variant_config in variant_configs:
        for cls in methods.values():
            for arch in config.archs:
                for seed in seeds:  # one folder per seed when there are several: <pair>-seed<N>
                    seed_config = dataclasses.replace(variant_config, seed=seed)
                    plan = plan_pair(cls, arch, seed_config, device, data.image_size)
                    folder_seed = seed if len(seeds) > 1 else None
                    plans.append((dataclasses.replace(plan, variant=name, seed=folder_seed), seed_config))

    reasons = [not_applicable(plan) for plan, _ in plans]
    if all(reasons):  # nothing to train: one line per pair, before any folder is made
        raise SSLBenchError("no pair of this run applies: " + "; ".join(dict.fromkeys(reasons)))
    for plan, plan_config in plans:  # a batch that cannot be filled is bad input, refused before training
        if not_applicable(plan) is None:
            check_batch_fits(plan, plan_config, data)
    lock: RunLock | None = None

    def claim() -> Path:
        nonlocal lock
        folder, lock = prepare_out_dir(config, restart, describe_environment(device, config.seed))
        return folder

    out_dir = on_main(claim)  # every rank agrees on the folder; the main rank holds its lock
    try:
        with stop_on_signals():
            return _run_pairs(plans, (data, eval_data), out_dir, show_progress, restart == "resume")
    except RunInterrupted as stop:
        stop.out_dir, stop.main = out_dir, is_main()  # the main rank's command line says how to resume it
        raise
    finally:
        if lock is not None:
            lock.release()


def evaluation_data(config: RunConfig, data: DatasetSplits) -> DatasetSplits | None:
    """The dataset of ``--eval-dataset`` at the size the network trains at, or None (the pretraining
    one); its low-shot settings are read here, so a typo stops the run before anything trains."""
    for spec in config.eval.low_shot:
        parse_low_shot(spec)
    if not config.eval.dataset:
        return None
    return load_dataset(
        config.eval.dataset,
        config.eval.data_root,
        data.image_size,
        config.download,
        bad_images=config.bad_images,
    )


def _no_numbers(status: str, reason: str, plan: PairPlan, seed: int) -> dict[str, Any]:
    """The record of a pair without numbers (failed, or not applicable), with why."""
    return {
        "status": status,
        "error": reason,
        "knn": None,
        "linear": None,
        "train": None,
        "protocol": {"recipe": plan.recipe, "seed": seed},
    }


def _run_pairs(
    plans: list[tuple[PairPlan, RunConfig]],
    datasets: tuple[DatasetSplits, DatasetSplits | None],
    out_dir: Path,
    show_progress: bool,
    resume: bool,
) -> RunOutcome:
    sources = list_methods()
    data, eval_data = datasets
    failed: list[str] = []
    progress = RunProgress(len(plans), show_progress and is_main())
    timings: dict[str, PairTime] = {}
    for plan, plan_config in plans:
        name = plan.method_cls.name
        pair_dir = out_dir / plan.folder_name
        if is_main():
            pair_dir.mkdir(parents=True, exist_ok=True)
        if resume and on_main(lambda pair_dir=pair_dir: finished_record(pair_dir)) is not None:
            progress.skip(plan.folder_name)
            continue  # finished before the interruption: its eval.json stands
        signum = agreed_stop()  # asked while a pair failed, or between pairs: stop before the next one
        if signum:
            raise RunInterrupted(f"stopped before {plan.folder_name}", signum=signum)
        record = {"method": name, "arch": plan.arch, "variant": plan.variant, "seed": plan_config.seed}
        record["method_source"] = sources.get(name, "unknown")
        reason = not_applicable(plan)
        if reason is not None:  # in the table as such, with the reason; nothing trains
            progress.skip(plan.folder_name, f"{NOT_APPLICABLE}: {reason}")
            if is_main():
                record |= _no_numbers(NOT_APPLICABLE, reason, plan, plan_config.seed)
                write_json_atomic(pair_dir / "eval.json", record)
            continue
        progress.start(plan.folder_name)
        started = time.perf_counter()
        try:
            evaluated = train_tracked(plan, plan_config, (data, eval_data), pair_dir, show_progress, resume)
            if evaluated is None:  # a helper rank of a distributed run: the main rank writes
                continue
            record |= evaluated
        except BadImageError:
            raise  # the data's problem, the same for every pair: stop with the file's name
        except Exception as error:  # one broken pair must not cost the others their results
            if not is_main():  # every rank failed alike (the loss guard agrees across ranks); one writes
                continue
            reason = str(error)
            if not isinstance(error, SSLBenchError):  # a bug, in the method or here: name who and where
                write_text_atomic(pair_dir / "traceback.txt", traceback.format_exc())
                reason = (
                    f"{type(error).__name__}: {error} (method '{name}' from {record['method_source']}; "
                    f"traceback in {pair_dir / 'traceback.txt'})"
                )
            record |= _no_numbers("failed", reason, plan, plan_config.seed)
            failed.append(f"{plan.folder_name}: {reason}")
        record["total_wall_s"] = round(time.perf_counter() - started, 2)
        progress.finish(record["total_wall_s"])
        timings[plan.folder_name] = pair_time(record)
        write_json_atomic(pair_dir / "eval.json", record)
        if record["status"] == "ok":  # its numbers are final and a resume keeps them: free the disk
            shutil.rmtree(pair_dir / CHECKPOINT_FOLDER, ignore_errors=True)

    if not is_main():
        return RunOutcome(out_dir, pd.DataFrame(), failed, main=False)
    results = load_results([out_dir])
    write_report(results, out_dir)
    write_training_curves(out_dir)
    write_collapse_diagnostics(out_dir)
    report_to_trackers(plans, out_dir)
    return RunOutcome(out_dir, results, failed, timings=timings)
