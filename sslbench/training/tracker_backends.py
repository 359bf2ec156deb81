"""One tracker's run for one pair: TensorBoard event files, an MLflow store, a W&B offline run, all under
``<run>/trackers/``. ``sslbench.training.trackers`` decides what they receive and when; each library is
imported only when its tracker starts (they are optional extras)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

FOLDER = "trackers"  # the run folder's <run>/trackers/: every tracker's files
WANDB_PROJECT = "sslbench"
MLFLOW_PARAM_CHARS = 500  # the shortest param value limit of MLflow versions in use
MLFLOW_BATCH = 100  # log_batch takes at most 100 params and 1000 metrics per call

Metrics = dict[str, float]


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


class Backend:
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


class TensorBoardBackend(Backend):
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


class MLflowBackend(Backend):
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


class WandBBackend(Backend):
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


BACKENDS: dict[str, type[Backend]] = {
    "tensorboard": TensorBoardBackend,
    "mlflow": MLflowBackend,
    "wandb": WandBBackend,
}
