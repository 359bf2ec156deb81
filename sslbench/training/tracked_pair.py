"""A pair's training mirrored into the run's trackers (``--log``): its records as metrics.jsonl gets
them, its numbers when it ends, and the run's tables and plots once the report is written."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sslbench.base.collectives import is_main
from sslbench.config import RunConfig, config_to_dict
from sslbench.data.datasets import DatasetSplits
from sslbench.training.runner import PairPlan, train_and_evaluate
from sslbench.training.trackers import STATE_FILE, PairTrackers

REPORT_FILES = ("table.md", "summary.csv", "summary.png", "curves.png", "collapse.png")


def train_tracked(
    plan: PairPlan,
    config: RunConfig,
    datasets: tuple[DatasetSplits, DatasetSplits | None],
    pair_dir: Path,
    show_progress: bool,
    resume: bool,
) -> dict[str, Any] | None:
    """``train_and_evaluate`` with the pair mirrored into the run's trackers (``--log``) on the main
    rank: its records as metrics.jsonl gets them, its numbers at the end; a resumed pair continues its
    tracker runs, a failed one marks them failed."""
    names = config.trackers if is_main() else []
    hparams = config_to_dict(config) | {"pair": plan.folder_name, "recipe": plan.recipe}
    trackers = PairTrackers.open(names, pair_dir.parent, pair_dir, hparams)
    try:
        record = train_and_evaluate(
            plan, config, datasets[0], pair_dir, show_progress, resume, datasets[1], trackers.log_records
        )
    except Exception:
        trackers.close(failed=True)
        raise
    except BaseException:  # interrupted: the tracker runs stay open to a resume
        trackers.close()
        raise
    if record is not None:
        trackers.log_result(record)
    trackers.close()
    return record


def report_to_trackers(plans: Sequence[tuple[PairPlan, RunConfig]], out_dir: Path) -> None:
    """The run's tables and plots, into the tracker run of every pair that has one."""
    for plan, config in plans:
        pair_dir = out_dir / plan.folder_name
        if config.trackers and is_main() and (pair_dir / STATE_FILE).is_file():
            trackers = PairTrackers.open(config.trackers, out_dir, pair_dir, {})
            trackers.log_artifacts([out_dir / name for name in REPORT_FILES])
            trackers.close()
