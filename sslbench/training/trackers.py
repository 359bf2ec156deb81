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
import logging
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

from sslbench.base.atomic_io import write_json_atomic
from sslbench.base.errors import SSLBenchError, unknown_name_message

TRACKERS = ("tensorboard", "mlflow", "wandb")
STATE_FILE = "trackers.json"
FOLDER = "trackers"  # the run folder's <run>/trackers/: every tracker's files
WANDB_PROJECT = "sslbench"
MLFLOW_PARAM_CHARS = 500  # the shortest param value limit of MLflow versions in use
MLFLOW_BATCH = 100  # log_batch takes at most 100 params and 1000 metrics per call

Metrics = dict[str, float]


class TrackerWarning(UserWarning):
    """A tracker was dropped; the run goes on without it."""


def check_tracker_names(names: Sequence[str]) -> None:
    """Raise one line for the first name that is not a tracker."""
    for name in names:
        if name not in TRACKERS:
            raise SSLBenchError(unknown_name_message("tracker", name, TRACKERS))


def flatten_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``: trackers want one level of scalar params."""
    flat: dict[str, Any] = {}
    for key, value in hparams.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten_hparams(value, f"{name}.")
        elif value is None or isinstance(value, (str, bool, int, float)):
            flat[name] = value
        else:  # lists, tuples, paths: one readable string
            flat[name] = str(value)
    return flat


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


class _Backend:
    """One tracker's run for one pair; ``start`` returns what trackers.json keeps of it."""

    name = ""

    def start(self, saved: Mapping[str, Any], hparams: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def log(self, steps: Sequence[tuple[int, Metrics]]) -> None:
        raise NotImplementedError

    def summary(self, metrics: Metrics, step: int) -> None:
        raise NotImplementedError

    def artifacts(self, files: Sequence[Path]) -> None:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        raise NotImplementedError


class _TensorBoard(_Backend):
    """Scalars by step; the config and markdown files as text, PNGs as images. A resume appends a new
    event file to the same folder, which TensorBoard reads as one run."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, pair: str) -> None:
        self.log_dir = run_dir / FOLDER / "tensorboard" / pair
        self.writer: Any = None

    def start(self, saved: Mapping[str, Any], hparams: Mapping[str, Any]) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        fresh = not self.log_dir.is_dir()
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        if fresh:
            rows = "\n".join(f"| {key} | {value} |" for key, value in flatten_hparams(hparams).items())
            self.writer.add_text("hparams", "| param | value |\n|---|---|\n" + rows)
            self.writer.flush()
        return {"logged": 0} if fresh else dict(saved)

    def log(self, steps: Sequence[tuple[int, Metrics]]) -> None:
        for step, metrics in steps:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def summary(self, metrics: Metrics, step: int) -> None:
        self.log([(step, {f"result/{name}": value for name, value in metrics.items()})])

    def artifacts(self, files: Sequence[Path]) -> None:
        for path in files:
            if path.suffix == ".md":
                self.writer.add_text(f"files/{path.name}", path.read_text(encoding="utf-8"))
            elif path.suffix == ".png":
                import numpy as np
                from PIL import Image

                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(f"files/{path.name}", pixels, dataformats="HWC")
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


@contextlib.contextmanager
def _quiet_database_setup() -> Iterator[None]:
    """MLflow's SQLite store announces its table creation and migrations at INFO; not on a run's console."""
    loggers = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic.runtime.migration")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _MLflow(_Backend):
    """The client API, not ``mlflow.start_run``: the fluent API keeps one active run per process, and a
    library must not take it from the user's own code."""

    name = "mlflow"

    def __init__(self, run_dir: Path, pair: str) -> None:
        self.tracking_uri = mlflow_tracking_uri(run_dir)
        self.artifact_root = (run_dir / FOLDER / "mlruns").resolve().as_uri()
        self.experiment, self.pair = run_dir.name, pair
        self.client: Any = None
        self.run_id = ""

    def start(self, saved: Mapping[str, Any], hparams: Mapping[str, Any]) -> dict[str, Any]:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        with _quiet_database_setup():
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            if saved.get("run_id") and self._exists(saved["run_id"]):
                self.run_id = saved["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return dict(saved)
            found = self.client.get_experiment_by_name(self.experiment)
            experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(self.experiment, artifact_location=self.artifact_root)
            )
            self.run_id = self.client.create_run(experiment_id, run_name=self.pair).info.run_id
        params = [Param(k, str(v)[:MLFLOW_PARAM_CHARS]) for k, v in flatten_hparams(hparams).items()]
        for first in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[first : first + MLFLOW_BATCH])
        return {"run_id": self.run_id, "logged": 0}

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except Exception:  # the store was deleted or moved: start a new run
            return False
        return True

    def log(self, steps: Sequence[tuple[int, Metrics]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [
            Metric(name, value, now, step) for step, metrics in steps for name, value in metrics.items()
        ]
        for first in range(0, len(entries), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=entries[first : first + MLFLOW_BATCH])

    def summary(self, metrics: Metrics, step: int) -> None:
        self.log([(step, metrics)])

    def artifacts(self, files: Sequence[Path]) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def mlflow_tracking_uri(run_dir: Path) -> str:
    """Where a run's MLflow store is: open it with ``mlflow ui --backend-store-uri <this>``."""
    (run_dir / FOLDER).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(run_dir / FOLDER / 'mlflow.db').resolve()}"


class _WandB(_Backend):
    """Offline mode: nothing leaves the machine; ``wandb sync <run_dir>/trackers/wandb/offline-run-*``
    uploads."""

    name = "wandb"

    def __init__(self, run_dir: Path, pair: str) -> None:
        self.run_dir, self.pair = run_dir, pair
        self.run: Any = None

    def start(self, saved: Mapping[str, Any], hparams: Mapping[str, Any]) -> dict[str, Any]:
        import wandb

        run_id = saved.get("run_id") or uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=WANDB_PROJECT,
            group=self.run_dir.name,
            name=self.pair,
            id=run_id,
            resume="allow",
            mode="offline",
            dir=str(self.run_dir / FOLDER),
            config=flatten_hparams(hparams),
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        return dict(saved) if saved.get("run_id") else {"run_id": run_id, "logged": 0}

    def log(self, steps: Sequence[tuple[int, Metrics]]) -> None:
        for step, metrics in steps:
            self.run.log(metrics, step=step)

    def summary(self, metrics: Metrics, step: int) -> None:
        self.run.summary.update(metrics)

    def artifacts(self, files: Sequence[Path]) -> None:
        for path in files:  # a copy in the run's folder, not a link: the sync finds it even if moved
            copy = Path(self.run.dir) / path.name
            shutil.copy2(path, copy)
            self.run.save(str(copy), base_path=self.run.dir, policy="now")

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


_BACKENDS: dict[str, type[_Backend]] = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


class PairTrackers:
    """The tracker runs of one pair. Open it on the main rank only, once per training session."""

    def __init__(self, pair_dir: Path, backends: dict[str, _Backend], saved: dict[str, Any]) -> None:
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
            backend = _BACKENDS[name](run_dir, pair_dir.name)
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
