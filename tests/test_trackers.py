"""Trackers mirror a pair's records, result and report files, continue their runs on a resume without
logging a record twice, and a failing tracker costs one warning, never the run."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from sslbench.base.errors import SSLBenchError
from sslbench.training import tracker_backends
from sslbench.training import trackers as trackers_module
from sslbench.training.tracker_backends import flatten_hparams, mlflow_tracking_uri
from sslbench.training.trackers import (
    TRACKERS,
    PairTrackers,
    TrackerWarning,
    check_tracker_names,
    record_metrics,
    result_metrics,
)

HPARAMS = {"seed": 0, "train": {"lr": 0.5, "epochs": 2, "views": [2, 6]}, "note": None}
EVAL = {
    "status": "ok",
    "knn": {"10": 30.5, "20": 31.0},
    "knn_ci95": {"20": [29.0, 33.0]},
    "linear": {"top1": 40.25, "ci95": [38.0, 42.5], "best_lr": 0.1},
    "low_shot": {"1pct": {"knn": {"20": 12.0}, "linear": None}},
    "protocol": {"test_images": 100},
}


def records(count: int) -> list[dict[str, Any]]:
    """Train records every 5 iterations, and after each second one an epoch's monitor record."""
    made: list[dict[str, Any]] = []
    for index in range(count):
        if index % 3 == 2:
            made.append({"kind": "monitor", "epoch": index // 3 + 1, "knn_student": 10.0 + index})
        else:
            iteration = 5 * index
            made.append({"kind": "train", "iteration": iteration, "epoch": 0, "loss": 1.0 / (1 + index),
                         "lr": 0.1, "note": "text", "finite": True})  # fmt: skip
    return made


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path]:
    run_dir = tmp_path / "run1"
    pair_dir = run_dir / "dino-vit_s16"
    pair_dir.mkdir(parents=True)
    return run_dir, pair_dir


def report_files(run_dir: Path) -> list[Path]:
    from PIL import Image

    (run_dir / "table.md").write_text("| method | knn |\n|---|---|\n| dino | 31.0 |\n")
    Image.new("RGB", (8, 6), (200, 10, 10)).save(run_dir / "summary.png")
    return [run_dir / "table.md", run_dir / "summary.png", run_dir / "missing.csv"]


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(event.step, round(event.value, 6)) for event in events.Scalars(tag)]


def test_unknown_tracker_is_one_line_listing_the_valid_ones(run: tuple[Path, Path]) -> None:
    with pytest.raises(SSLBenchError, match="did you mean 'mlflow'") as raised:
        check_tracker_names(["tensorboard", "mlfow"])
    assert "\n" not in str(raised.value) and all(name in str(raised.value) for name in TRACKERS)
    with pytest.raises(SSLBenchError, match="unknown tracker 'neptune'"):
        PairTrackers.open(["neptune"], run[0], run[1], HPARAMS)


def test_no_trackers_do_nothing(run: tuple[Path, Path]) -> None:
    run_dir, pair_dir = run
    trackers = PairTrackers.open([], run_dir, pair_dir, HPARAMS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trackers.log_records(records(4))
        trackers.log_result(EVAL)
        trackers.log_artifacts(report_files(run_dir))
        trackers.close()
    assert sorted(path.name for path in run_dir.iterdir()) == ["dino-vit_s16", "summary.png", "table.md"]
    assert list(pair_dir.iterdir()) == []


def test_metrics_are_the_numbers_of_records_and_results() -> None:
    assert flatten_hparams(HPARAMS) == {
        "seed": 0, "train.lr": 0.5, "train.epochs": 2, "train.views": "[2, 6]", "note": None
    }  # fmt: skip
    assert record_metrics(records(1)[0]) == {"train/epoch": 0.0, "train/loss": 1.0, "train/lr": 0.1}
    assert result_metrics(EVAL) == {
        "knn_10": 30.5,
        "knn_20": 31.0,
        "knn_20_ci95_low": 29.0,
        "knn_20_ci95_high": 33.0,
        "linear_top1": 40.25,
        "linear_top1_ci95_low": 38.0,
        "linear_top1_ci95_high": 42.5,
        "low_shot_1pct_knn_20": 12.0,
    }
    assert result_metrics({"status": "failed", "knn": None, "linear": None}) == {}


def test_tensorboard_scalars_text_and_images(run: tuple[Path, Path]) -> None:
    pytest.importorskip("tensorboard")
    run_dir, pair_dir = run
    trackers = PairTrackers.open(["tensorboard"], run_dir, pair_dir, HPARAMS)
    trackers.log_records(records(5))
    trackers.log_result(EVAL)
    trackers.log_artifacts(report_files(run_dir))
    trackers.close()
    log_dir = run_dir / "trackers" / "tensorboard" / "dino-vit_s16"
    assert scalars(log_dir, "train/loss") == [(0, 1.0), (5, 0.5), (15, 0.25), (20, 0.2)]
    assert scalars(log_dir, "monitor/knn_student") == [(5, 12.0)]  # the iteration before it
    assert scalars(log_dir, "result/knn_20") == [(20, 31.0)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert events.Tags()["images"] == ["files/summary.png"]
    assert {"hparams/text_summary", "files/table.md/text_summary"} <= set(events.Tags()["tensors"])


def test_mlflow_metrics_params_and_artifacts(run: tuple[Path, Path]) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir, pair_dir = run
    trackers = PairTrackers.open(["mlflow"], run_dir, pair_dir, HPARAMS)
    trackers.log_records(records(5))
    trackers.log_result(EVAL)
    trackers.log_artifacts(report_files(run_dir))
    trackers.close()
    client = MlflowClient(tracking_uri=mlflow_tracking_uri(run_dir))
    experiment = client.get_experiment_by_name("run1")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "dino-vit_s16" and found.info.status == "FINISHED"
    assert found.data.params == {
        "seed": "0", "train.lr": "0.5", "train.epochs": "2", "train.views": "[2, 6]", "note": "None"
    }  # fmt: skip
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (5, 0.5), (15, 0.25), (20, 0.2)]
    assert found.data.metrics["linear_top1"] == 40.25 and found.data.metrics["knn_20_ci95_high"] == 33.0
    assert sorted(f.path for f in client.list_artifacts(found.info.run_id)) == ["summary.png", "table.md"]
    assert (run_dir / "trackers" / "mlruns").is_dir()


def test_resume_continues_the_runs_without_duplicates(run: tuple[Path, Path]) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir, pair_dir = run
    first = PairTrackers.open(["tensorboard", "mlflow"], run_dir, pair_dir, HPARAMS)
    first.log_records(records(2))
    first.log_records(records(2))  # again, nothing new
    first.close()
    run_id = first.saved["trackers"]["mlflow"]["run_id"]
    second = PairTrackers.open(["tensorboard", "mlflow"], run_dir, pair_dir, HPARAMS)
    assert second.saved["trackers"]["mlflow"]["run_id"] == run_id
    second.log_records(records(5))
    second.close()
    expected = [(0, 1.0), (5, 0.5), (15, 0.25), (20, 0.2)]
    assert scalars(run_dir / "trackers" / "tensorboard" / "dino-vit_s16", "train/loss") == expected
    client = MlflowClient(tracking_uri=mlflow_tracking_uri(run_dir))
    assert len(client.search_runs([client.get_experiment_by_name("run1").experiment_id])) == 1
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == expected


def test_a_failing_tracker_warns_once_and_the_others_log(
    run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run_dir, pair_dir = run

    def broken(*args: Any) -> None:
        raise RuntimeError("store unreachable\nsecond line")

    monkeypatch.setattr(tracker_backends.MLflowBackend, "start", broken)
    monkeypatch.setattr(tracker_backends.TensorBoardBackend, "log", broken)
    with pytest.warns(TrackerWarning) as caught:
        trackers = PairTrackers.open(["mlflow", "tensorboard"], run_dir, pair_dir, HPARAMS)
        trackers.log_records(records(2))
        trackers.log_records(records(4))
        trackers.close()
    messages = [str(w.message) for w in caught if issubclass(w.category, TrackerWarning)]
    assert messages == [
        "tracker 'mlflow' could not start and is dropped for this pair: RuntimeError: store unreachable",
        "tracker 'tensorboard' failed while logging and is dropped for this pair: RuntimeError: "
        "store unreachable",
    ]
    assert trackers.backends == {}


def test_a_tracker_failing_to_log_leaves_the_others(
    run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorboard")
    run_dir, pair_dir = run

    class Broken(tracker_backends.Backend):
        name = "mlflow"

        def __init__(self, *args: Any) -> None: ...
        def start(self, saved: Any, hparams: Any) -> dict[str, Any]:
            return {"logged": 0}

        def log(self, steps: Any) -> None:
            raise OSError("disk full")

        def close(self, failed: bool) -> None: ...

    monkeypatch.setitem(tracker_backends.BACKENDS, "mlflow", Broken)
    trackers = PairTrackers.open(["mlflow", "tensorboard"], run_dir, pair_dir, HPARAMS)
    with pytest.warns(TrackerWarning, match="'mlflow' failed while logging .* OSError: disk full"):
        trackers.log_records(records(2))
    trackers.log_records(records(4))
    trackers.close()
    assert list(trackers_module._read_state(pair_dir / "trackers.json")["trackers"]) == [
        "mlflow",
        "tensorboard",
    ]
    assert trackers.saved["trackers"]["mlflow"]["logged"] == 0  # never logged: a resume tries them all
    assert len(scalars(run_dir / "trackers" / "tensorboard" / "dino-vit_s16", "train/loss")) == 3


def test_wandb_offline_run_folder_and_resume(run: tuple[Path, Path]) -> None:
    pytest.importorskip("wandb")
    run_dir, pair_dir = run
    first = PairTrackers.open(["wandb"], run_dir, pair_dir, HPARAMS)
    first.log_records(records(2))
    first.close()
    second = PairTrackers.open(["wandb"], run_dir, pair_dir, HPARAMS)
    second.log_records(records(4))
    second.log_result(EVAL)
    second.log_artifacts(report_files(run_dir))
    second.close()
    run_id = first.saved["trackers"]["wandb"]["run_id"]
    assert second.saved["trackers"]["wandb"] == {"run_id": run_id, "logged": 4}
    folders = sorted((run_dir / "trackers" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert folders and all((folder / f"run-{run_id}.wandb").is_file() for folder in folders)
    assert any((folder / "files" / "table.md").is_file() for folder in folders)


def test_a_run_with_log_mirrors_each_pair_into_the_trackers(tmp_path: Path) -> None:
    """``sslbench run --log tensorboard,mlflow``: the pair's training scalars at their iterations, its
    final numbers, the run's config as parameters and the run's table as an artifact."""
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    import contextlib
    import io
    import json

    from sslbench.cli import main

    out = tmp_path / "logged"
    argv = ["run", "--methods", "dino", "--arch", "resnet18", "--epochs", "1", "--batch-size", "8",
            "--no-progress", "--set", "train.train_per_class=2", "--set", "eval.train_per_class=3",
            "--set", "eval.test_per_class=2", "--set", "eval.monitor_every=0", "--set", "eval.linear=false",
            "--set", "train.log_every=1", "--set", "dino.out_dim=64", "--set", "dino.hidden_dim=64",
            "--set", "dino.local_crops_number=1", "--log", "tensorboard,mlflow",
            "--out", str(out)]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
    lines = (out / "dino-resnet18" / "metrics.jsonl").read_text().splitlines()
    logged = [(r["iteration"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]
    found = scalars(out / "trackers" / "tensorboard" / "dino-resnet18", "train/loss")
    assert [step for step, _ in found] == [step for step, _ in logged]
    assert [value for _, value in found] == pytest.approx([value for _, value in logged])
    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_tracking_uri(out))
    (experiment,) = [e for e in client.search_experiments() if e.name == out.name]
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    knn = json.loads((out / "dino-resnet18" / "eval.json").read_text())["knn"]["20"]
    assert mlflow_run.data.metrics["knn_20"] == pytest.approx(knn)
    assert mlflow_run.data.params["train.batch_size"] == "8"
    assert "table.md" in {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert not (out / "trackers" / "eval.json").exists()  # not a pair: the report skips the folder
