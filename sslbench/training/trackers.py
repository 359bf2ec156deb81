"""Mirror a pair's training into experiment trackers (TensorBoard, MLflow, W&B), all offline.

The run folder stays the record of truth (metrics.jsonl, eval.json, summary.csv); a tracker is a view
of it for people who browse runs there. So a tracker must never cost a run: one that cannot be imported,
cannot start or fails while logging is dropped with one warning and training goes on.

One tracker run per pair, grouped by the run folder:

- TensorBoard: event files in ``<run_dir>/trackers/tensorboard/<pair>/``;
- MLflow: the SQLite store ``<run_dir>/trackers/mlflow.db``, artifacts in ``<run_dir>/trackers/mlruns/``,
  experiment = run folder name, run name = pair (MLflow 3 refuses the plain file store unless an
  environment variable opts in, so a database it keeps supporting is used instead);
- W&B: offline runs in ``<run_dir>/trackers/wandb/`` (``wandb sync`` uploads them), group = run folder name.

A resumed pair continues the same tracker runs: their ids and how many records each has logged are kept
in ``<pair_dir>/trackers.json``. ``TrainState.records`` is append-only and a resume restores a prefix of
it, so a record's position is its identity: records before the count are never logged again.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

from sslbench.base.atomic_io import write_json_atomic
from sslbench.base.errors import SSLBenchError, unknown_name_message
from sslbench.training.tracker_backends import (
    BACKENDS,
    Backend,
    Metrics,
)

TRACKERS = ("tensorboard", "mlflow", "wandb")
STATE_FILE = "trackers.json"


class TrackerWarning(UserWarning):
    """A tracker was dropped; the run goes on without it."""


def check_tracker_names(names: Sequence[str]) -> None:
    """Raise one line for the first name that is not a tracker."""
    for name in names:
        if name not in TRACKERS:
            raise SSLBenchError(unknown_name_message("tracker", name, TRACKERS))


def metric_name(name: str) -> str:
    """A name every tracker accepts (MLflow allows letters, digits, ``_-. /``)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def record_metrics(record: Mapping[str, Any]) -> Metrics:
    """A record's numbers as ``<kind>/<key>``; the iteration is the step, so it is not a metric."""
    kind = str(record.get("kind") or "train")
    return {
        metric_name(f"{kind}/{key}"): float(value)
        for key, value in record.items()
        if key not in ("kind", "iteration") and _is_number(value)
    }


def _top1_with_interval(name: str, top1: Any, ci95: Any) -> Metrics:
    metrics: Metrics = {}
    if _is_number(top1):
        metrics[name] = float(top1)
    if isinstance(ci95, Sequence) and len(ci95) == 2 and all(_is_number(v) for v in ci95):
        metrics[f"{name}_ci95_low"], metrics[f"{name}_ci95_high"] = float(ci95[0]), float(ci95[1])
    return metrics


def _evaluation_metrics(evaluation: Mapping[str, Any], prefix: str = "") -> Metrics:
    """``knn_<k>``, ``linear_top1`` and their 95% intervals where eval.json has them."""
    metrics: Metrics = {}
    intervals = evaluation.get("knn_ci95") or {}
    for k, top1 in (evaluation.get("knn") or {}).items():
        metrics |= _top1_with_interval(f"{prefix}knn_{k}", top1, intervals.get(k))
    linear = evaluation.get("linear")
    if isinstance(linear, Mapping):
        metrics |= _top1_with_interval(f"{prefix}linear_top1", linear.get("top1"), linear.get("ci95"))
    return metrics


def result_metrics(eval_record: Mapping[str, Any]) -> Metrics:
    """The final numbers of an eval.json record, low-shot settings as ``low_shot_<setting>_<metric>``."""
    metrics = _evaluation_metrics(eval_record)
    for setting, evaluation in (eval_record.get("low_shot") or {}).items():
        if isinstance(evaluation, Mapping):
            metrics |= _evaluation_metrics(evaluation, f"low_shot_{setting}_")
    return {metric_name(name): value for name, value in metrics.items()}


class PairTrackers:
    """The tracker runs of one pair. Open it on the main rank only, once per training session."""

    def __init__(self, pair_dir: Path, backends: dict[str, Backend], saved: dict[str, Any]) -> None:
        self.pair_dir = pair_dir
        self.backends = backends
        self.saved = saved  # trackers.json: {"last_step": int, "trackers": {name: {"run_id", "logged"}}}

    @classmethod
    def open(
        cls, names: Sequence[str], run_dir: Path, pair_dir: Path, hparams: Mapping[str, Any]
    ) -> PairTrackers:
        """Start (or, with a trackers.json, continue) each named tracker's run; one that fails is dropped."""
        check_tracker_names(names)
        saved = _read_state(pair_dir / STATE_FILE) if names else {}
        saved.setdefault("trackers", {})
        trackers = cls(pair_dir, {}, saved)
        for name in dict.fromkeys(names):
            backend = BACKENDS[name](run_dir, pair_dir.name)
            try:
                saved["trackers"][name] = backend.start(saved["trackers"].get(name, {}), hparams)
            except Exception as error:
                _warn_dropped(name, "could not start", error)
                continue
            trackers.backends[name] = backend
        if trackers.backends:
            trackers._save()
        return trackers

    def log_records(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Log the records no tracker has logged yet, at step = iteration; a record without one (the
        epoch's k-NN monitor) takes the iteration of the record before it."""
        if not self.backends:
            return
        steps: list[tuple[int, Metrics]] = []
        step = 0
        for record in records:
            iteration = record.get("iteration")
            step = int(iteration) if _is_number(iteration) else step
            steps.append((step, record_metrics(record)))
        self.saved["last_step"] = step
        for name, backend in list(self.backends.items()):
            logged = self.saved["trackers"][name].get("logged", 0)
            if logged < len(steps) and self._call(name, "failed while logging", backend.log, steps[logged:]):
                self.saved["trackers"][name]["logged"] = len(steps)
        self._save()

    def log_result(self, eval_record: Mapping[str, Any]) -> None:
        """The pair's final numbers (eval.json) as summary metrics, at the last training step."""
        metrics = result_metrics(eval_record)
        if metrics:
            step = int(self.saved.get("last_step", 0))
            for name, backend in list(self.backends.items()):
                self._call(name, "failed while logging the result", backend.summary, metrics, step)

    def log_artifacts(self, files: Sequence[Path]) -> None:
        """Attach the run's report files (those that exist) to each tracker run."""
        existing = [Path(path) for path in files if Path(path).is_file()]
        if existing:
            for name, backend in list(self.backends.items()):
                self._call(name, "failed while saving files", backend.artifacts, existing)

    def close(self, failed: bool = False) -> None:
        """End the tracker runs (MLflow FAILED / W&B exit code 1 when ``failed``); idempotent."""
        for name, backend in list(self.backends.items()):
            self._call(name, "failed to close", backend.close, failed)
        self.backends.clear()

    def _call(self, name: str, what: str, method: Any, *args: Any) -> bool:
        """Whether ``method`` worked; if not, the tracker is dropped with one warning."""
        try:
            method(*args)
            return True
        except Exception as error:
            _warn_dropped(name, what, error)
            backend = self.backends.pop(name)
            with contextlib.suppress(Exception):  # release its files; its error was reported above
                if method != backend.close:
                    backend.close(True)
            return False

    def _save(self) -> None:
        try:
            write_json_atomic(self.pair_dir / STATE_FILE, self.saved)
        except OSError as error:  # not worth a run: the next resume may log some records twice
            message = f"trackers: could not write {self.pair_dir / STATE_FILE}: {error}"
            warnings.warn(message, TrackerWarning, stacklevel=3)


def _read_state(path: Path) -> dict[str, Any]:
    """trackers.json, or nothing when it is missing or unreadable (the trackers then start new runs)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and isinstance(state.get("trackers", {}), dict) else {}


def _warn_dropped(name: str, what: str, error: BaseException) -> None:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    message = f"tracker '{name}' {what} and is dropped for this pair: {type(error).__name__}: {reason}"
    warnings.warn(message.rstrip(": "), TrackerWarning, stacklevel=3)
