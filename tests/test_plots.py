"""Plot tests on hand-written metrics.jsonl folders: no training, so they run in a few seconds."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest

from sslbench.reporting.plots import (
    BASE_COLUMNS,
    load_metrics,
    write_collapse_diagnostics,
    write_training_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEALTHY = 1 / math.sqrt(64)


def _train(it: int, *, dino: bool, collapse: bool = False, shift: float = 0.0) -> dict[str, Any]:
    """A train line shaped like the runner's; collapse shrinks the spread to zero, shift keeps pairs apart."""
    spread = HEALTHY * (max(0.02, 1 - it / 30) if collapse else 0.8 + 0.004 * it - 0.1 * shift)
    line: dict[str, Any] = {
        "kind": "train", "iteration": it, "epoch": it // 10, "loss": 5.0 - 0.1 * it + shift,
        "lr": 1e-3 * min(1, it / 10) * (1 + shift), "weight_decay": 0.04, "ema_momentum": 0.996,
        "images_per_s": 900.0, "elapsed_s": 0.1 * it, "embedding_std": spread,
        "embedding_std_healthy": HEALTHY, "effective_rank": 40.0 - (30 if collapse else 0) - 5 * shift,
    }  # fmt: skip
    if dino:
        line.update(teacher_entropy=4.0 - 0.05 * it - shift, teacher_student_kl=0.5 + 0.01 * it + shift)
        line["teacher_temp"] = 0.04
    return line


def _write_pair(run: Path, folder: str, ev: dict[str, Any] | None, lines: list[Any]) -> None:
    pair = run / folder
    pair.mkdir(parents=True)
    if ev is not None:
        (pair / "eval.json").write_text(json.dumps(ev), encoding="utf-8")
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    (pair / "metrics.jsonl").write_text(text, encoding="utf-8")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """DINO with a teacher, BYOL without one (plus a kind-less and a torn line), and an ablation variant."""
    run = tmp_path / "run1"
    dino = [{"kind": "monitor", "epoch": e, "knn_student": 20.0 + 5 * e, "knn_teacher": 22.0 + 6 * e}
            for e in range(3)]  # fmt: skip
    dino += [_train(it, dino=True) for it in range(0, 30, 2)]
    ev: dict[str, Any] = {"method": "dino", "arch": "vit_s16", "variant": None, "status": "ok"}
    _write_pair(run, "dino-vit_s16", ev, dino)
    byol: list[Any] = [{"kind": "monitor", "epoch": e, "knn_student": 18.0 + 4 * e} for e in range(3)]
    byol += [_train(it, dino=False, shift=1.0) for it in range(0, 30, 2)]
    byol.append({"iteration": 30, "loss": 1.5, "lr": 1e-3})  # Older runs wrote no "kind".
    byol.append('{"kind": "train", "iteration": 3')  # Torn by a crash.
    _write_pair(run, "byol-resnet18", {"method": "byol", "arch": "resnet18", "status": "ok"}, byol)
    variant = [_train(it, dino=True, collapse=True, shift=0.5) for it in range(0, 30, 2)]
    ev = {"method": "dino", "arch": "vit_tiny16", "variant": "no_centering", "status": "failed"}
    _write_pair(run, "dino@no_centering-vit_tiny16", ev, variant)
    return run


def _load_quietly(run: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_metrics(run)


def _assert_png(path: Path | None, expected: Path) -> None:
    assert path == expected
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert not list(path.parent.glob(f".{path.name}.*"))  # No temporary file left behind.


def test_load_metrics_columns_labels_and_kinds(run_dir: Path) -> None:
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable line\(s\) of .*byol-resnet18"):
        df = load_metrics(run_dir)
    assert list(df.columns[:3]) == BASE_COLUMNS
    expected = {"loss", "lr", "knn_student", "knn_teacher", "teacher_entropy", "effective_rank"}
    assert expected <= set(df.columns)
    assert set(df["label"]) == {"dino/vit_s16", "byol/resnet18", "dino [no_centering]/vit_tiny16"}
    assert set(df["kind"]) == {"train", "monitor"}
    byol = df[df["pair"] == "byol-resnet18"]
    assert (byol["kind"] == "monitor").sum() == 3
    # 15 written as train + 1 without a kind; the torn one is dropped.
    assert (byol["kind"] == "train").sum() == 16
    kindless = byol[byol["iteration"] == 30]
    assert list(kindless["kind"]) == ["train"] and math.isnan(kindless["embedding_std"].iloc[0])
    assert df["knn_teacher"].dtype.kind == "f" and df.loc[byol.index, "knn_teacher"].isna().all()


def test_load_metrics_label_falls_back_to_folder_name(tmp_path: Path) -> None:
    _write_pair(tmp_path, "simclr@no_proj-resnet18", None, [{"iteration": 0, "loss": 2.0}])
    _write_pair(tmp_path, "supervised-vit_tiny16", {"status": "ok"}, [{"iteration": 0, "loss": 2.0}])
    df = load_metrics(tmp_path)
    assert set(df["label"]) == {"simclr@no_proj-resnet18", "supervised-vit_tiny16"}  # no usable eval.json


def test_load_metrics_empty(tmp_path: Path) -> None:
    assert load_metrics(tmp_path).empty and list(load_metrics(tmp_path).columns) == BASE_COLUMNS
    assert load_metrics(tmp_path / "missing").empty
    (tmp_path / "dino-resnet18").mkdir()
    (tmp_path / "dino-resnet18" / "metrics.jsonl").write_text("", encoding="utf-8")
    assert list(load_metrics(tmp_path).columns) == BASE_COLUMNS


@pytest.mark.filterwarnings("ignore:skipping")
def test_writers_create_pngs(run_dir: Path) -> None:
    _assert_png(write_training_curves(run_dir), run_dir / "curves.png")
    _assert_png(write_collapse_diagnostics(run_dir), run_dir / "collapse.png")


@pytest.mark.filterwarnings("ignore:skipping")
def test_writers_respect_out_dir(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots" / "nested"
    _assert_png(write_training_curves(run_dir, out), out / "curves.png")
    _assert_png(write_collapse_diagnostics(run_dir, out, threshold=0.2), out / "collapse.png")
    assert not (run_dir / "curves.png").exists() and not (run_dir / "collapse.png").exists()


def test_writers_return_none_without_metrics(tmp_path: Path) -> None:
    run = tmp_path / "empty_run"
    (run / "dino-resnet18").mkdir(parents=True)
    (run / "dino-resnet18" / "eval.json").write_text('{"method": "dino"}', encoding="utf-8")
    assert write_training_curves(run) is None
    assert write_collapse_diagnostics(run) is None
    assert sorted(p.name for p in run.rglob("*")) == ["dino-resnet18", "eval.json"]


def test_only_monitor_or_no_diagnostics(tmp_path: Path) -> None:
    """A run with losses but no diagnostics still gets curves; one with only monitor lines gets neither."""
    monitor_only = [{"kind": "monitor", "epoch": 0, "knn_student": 10.0}]
    _write_pair(tmp_path / "a", "random-resnet18", None, monitor_only)
    assert write_training_curves(tmp_path / "a") is None
    loss_only = [{"iteration": i, "loss": 1.0 / (i + 1)} for i in range(5)]
    _write_pair(tmp_path / "b", "byol-resnet18", None, loss_only)
    _assert_png(write_training_curves(tmp_path / "b"), tmp_path / "b" / "curves.png")
    assert write_collapse_diagnostics(tmp_path / "b") is None
