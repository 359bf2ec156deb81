"""Report tests on hand-written eval.json folders: no training, so they run in well under a second."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sslbench.base.errors import SSLBenchError
from sslbench.reporting.tables import (
    comparison_table,
    format_table_text,
    load_results,
    protocol_summary,
    write_report,
)

PAIRS = [("dino", "resnet18"), ("dino", "vit_tiny16"), ("byol", "resnet18"), ("byol", "vit_tiny16"),
         ("supervised", "resnet18"), ("supervised", "vit_tiny16")]  # fmt: skip


def _eval(
    method: str, arch: str, *, failed: bool = False, seed: int = 0, knn20: float = 40.0
) -> dict[str, Any]:
    """An eval.json shaped like the runner's; numbers differ per pair so mix-ups show."""
    bump = {"dino": 5.0, "byol": 2.0, "supervised": 8.0, "simclr": 3.0}[method] + (
        1.0 if arch.startswith("vit") else 0.0
    )
    protocol = {
        "dataset": "embedded", "train_images": 500, "test_images": 100, "image_size": 32,
        "patch_size": 4 if arch.startswith("vit") else None, "crops": "2x32 + 6x16", "epochs": 2,
        "batch_size": 64, "optimizer": "adamw", "base_lr": 0.0005, "recipe": "shared", "precision": "fp32",
        "seed": seed, "config_hash": "1a2b3c4d", "device": "cpu", "feature_source": "teacher backbone",
        "knn_k": 20, "knn_temperature": 0.07, "linear_features": "cls tokens of last 4 blocks",
    }  # fmt: skip
    if failed:
        return {"method": method, "arch": arch, "status": "failed", "error": "CUDA out of memory",
                "method_source": "builtin", "knn": None, "linear": None, "train": None,
                "protocol": protocol}  # fmt: skip
    return {
        "method": method, "arch": arch, "status": "ok", "error": None,
        "method_source": f"builtin (sslbench_methods.{method})",
        "knn": {"10": knn20 - 1 + bump, "20": knn20 + bump, "100": knn20 - 2 + bump, "200": None},
        "linear": {"top1": 50.0 + bump, "best_lr": 0.1, "val_top1": {"0.1": 48.0}},
        "train": {"epochs": 2, "wall_s": 12.5, "images_per_s": 40.0, "final_loss": 3.25},
        "protocol": protocol,
    }  # fmt: skip


def _write(run: Path, ev: dict[str, Any]) -> None:
    folder = run / f"{ev['method']}-{ev['arch']}"
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps(ev), encoding="utf-8")
    (folder / "metrics.jsonl").write_text("{}\n", encoding="utf-8")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Six pairs, byol/vit_tiny16 failed, plus an incomplete simclr folder with no eval.json."""
    run = tmp_path / "run_a"
    for method, arch in PAIRS:
        _write(run, _eval(method, arch, failed=(method, arch) == ("byol", "vit_tiny16")))
    (run / "simclr-resnet18").mkdir()
    (run / "simclr-resnet18" / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    (run / "config.yaml").write_text("seed: 0\n", encoding="utf-8")
    return run


@pytest.fixture
def df(run_dir: Path) -> pd.DataFrame:
    with pytest.warns(UserWarning, match="simclr-resnet18"):
        return load_results([run_dir])


def test_load_results_flattens_and_skips_incomplete(df: pd.DataFrame) -> None:
    assert len(df) == 6
    assert "simclr" not in set(df["method"])
    for col in ["run", "method", "arch", "status", "error", "knn_10", "knn_20", "knn_100", "knn_200",
                "linear_top1", "linear_best_lr", "train_wall_s", "train_images_per_s", "final_loss",
                "dataset", "patch_size", "knn_k", "feature_source", "config_hash"]:  # fmt: skip
        assert col in df.columns, col
    row = df[(df["method"] == "dino") & (df["arch"] == "vit_tiny16")].iloc[0]
    assert row["run"] == "run_a" and row["status"] == "ok"
    assert row["knn_20"] == pytest.approx(46.0)
    assert row["linear_top1"] == pytest.approx(56.0)
    assert math.isnan(row["knn_200"])
    assert row["train_wall_s"] == pytest.approx(12.5) and row["final_loss"] == pytest.approx(3.25)
    assert row["patch_size"] == 4
    failed = df[(df["method"] == "byol") & (df["arch"] == "vit_tiny16")].iloc[0]
    assert failed["status"] == "failed" and failed["error"] == "CUDA out of memory"
    assert math.isnan(failed["knn_20"]) and math.isnan(failed["linear_top1"])


def test_comparison_table_layout(df: pd.DataFrame) -> None:
    table = comparison_table(df)
    assert list(table.index) == ["byol", "dino", "supervised"]  # folder order, first appearance
    assert isinstance(table.columns, pd.MultiIndex)
    assert list(table.columns.names) == ["arch", "metric"]
    assert list(table.columns) == [
        ("resnet18", "linear"),
        ("resnet18", "k-NN"),
        ("vit_tiny16 (patch 4)", "linear"),
        ("vit_tiny16 (patch 4)", "k-NN"),
    ]
    assert table.loc["dino", ("vit_tiny16 (patch 4)", "k-NN")] == "46.0"
    assert table.loc["dino", ("resnet18", "linear")] == "55.0"
    assert table.loc["byol", ("vit_tiny16 (patch 4)", "linear")] == "failed"
    assert table.loc["byol", ("vit_tiny16 (patch 4)", "k-NN")] == "failed"


def test_missing_pair_and_null_linear_show_dash(df: pd.DataFrame) -> None:
    partial = df[~((df["method"] == "supervised") & (df["arch"] == "resnet18"))].copy()
    partial.loc[partial["method"] == "dino", "linear_top1"] = float("nan")
    table = comparison_table(partial)
    assert table.loc["supervised", ("resnet18", "k-NN")] == "–"
    assert table.loc["dino", ("resnet18", "linear")] == "–"
    assert table.loc["dino", ("resnet18", "k-NN")] == "45.0"


def test_headline_k_follows_protocol(df: pd.DataFrame) -> None:
    df = df.assign(knn_k=10)
    assert comparison_table(df).loc["dino", ("resnet18", "k-NN")] == "44.0"


def test_protocol_summary_common_and_varies(df: pd.DataFrame) -> None:
    lines = protocol_summary(df)
    for key in ["knn_k", "knn_temperature", "feature_source", "crops", "epochs", "batch_size", "precision",
                "dataset", "seed"]:  # fmt: skip
        assert any(line.startswith(f"{key}: ") for line in lines), key
    assert "knn_k: 20" in lines
    assert "knn_temperature: 0.07" in lines
    assert "crops: 2x32 + 6x16" in lines
    patch = next(line for line in lines if line.startswith("patch_size: "))
    assert patch.startswith("patch_size: varies (")
    assert "dino/vit_tiny16=4" in patch and "dino/resnet18=n/a" in patch


def test_format_table_text_lists_failures(df: pd.DataFrame) -> None:
    text = format_table_text(df)
    assert "| method" in text and "vit_tiny16 (patch 4) / k-NN" in text
    assert "Protocol:" in text and "- seed: 0" in text
    assert "not the reference's eval_linear.py" in text  # the linear column is not the paper's
    assert "byol/vit_tiny16 (run run_a): CUDA out of memory" in text


def test_write_report_files(df: pd.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "report"
    paths = write_report(df, out)
    names = {p.name for p in paths}
    assert names == {"summary.csv", "table.md", "table.tex", "summary.png"}
    assert all(p.is_file() for p in paths)
    png = (out / "summary.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    back = pd.read_csv(out / "summary.csv")
    assert list(back.columns) == list(df.columns) and len(back) == len(df)
    for col in ["knn_20", "linear_top1", "train_wall_s"]:
        pd.testing.assert_series_equal(back[col], df[col])
    tex = (out / "table.tex").read_text(encoding="utf-8")
    assert "\\begin{tabular}" in tex and "\\caption{" in tex
    for method in ["dino", "byol", "supervised"]:
        assert method in tex
    assert "vit\\_tiny16" in tex and "knn\\_k: 20" in tex
    md = (out / "table.md").read_text(encoding="utf-8")
    assert md.startswith("# ") and "failed" in md
    assert not list(out.glob(".*.tmp"))


def test_protocol_survives_csv_round_trip(df: pd.DataFrame, tmp_path: Path) -> None:
    write_report(df, tmp_path)
    back = pd.read_csv(tmp_path / "summary.csv")
    assert protocol_summary(back) == protocol_summary(df)
    assert comparison_table(back).equals(comparison_table(df))


def test_merge_later_run_wins(run_dir: Path, tmp_path: Path) -> None:
    run_b = tmp_path / "run_b"
    _write(run_b, _eval("dino", "resnet18", seed=1, knn20=60.0))
    _write(run_b, _eval("simclr", "resnet18", seed=1))
    with pytest.warns(UserWarning) as record:
        merged = load_results([run_dir, run_b])
    messages = [str(w.message) for w in record]
    assert any("dino/resnet18" in m and "run_b" in m for m in messages)
    assert len(merged) == 7
    dino = merged[(merged["method"] == "dino") & (merged["arch"] == "resnet18")].iloc[0]
    assert dino["run"] == "run_b" and dino["knn_20"] == pytest.approx(65.0)
    assert list(comparison_table(merged).index) == ["byol", "dino", "supervised", "simclr"]
    seed = next(line for line in protocol_summary(merged) if line.startswith("seed: "))
    assert seed.startswith("seed: varies (") and "dino/resnet18=1" in seed


def test_missing_or_empty_run_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(SSLBenchError, match="does not exist"):
        load_results([tmp_path / "nope"])
    empty = tmp_path / "empty"
    (empty / "dino-resnet18").mkdir(parents=True)
    with pytest.warns(UserWarning), pytest.raises(SSLBenchError, match=str(empty)):
        load_results([empty])


def test_all_failed_does_not_crash(tmp_path: Path) -> None:
    run = tmp_path / "run_fail"
    for method, arch in PAIRS[:2]:
        _write(run, _eval(method, arch, failed=True))
    df = load_results([run])
    table = comparison_table(df)
    assert (table == "failed").all().all()
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.png").write_bytes(b"stale")
    with pytest.warns(UserWarning, match="nothing|no successful"):
        paths = write_report(df, out)
    assert {p.name for p in paths} == {"summary.csv", "table.md", "table.tex"}
    assert not (out / "summary.png").exists()
    assert "nothing to compare" in format_table_text(df)


def test_skipped_linear_everywhere(df: pd.DataFrame, tmp_path: Path) -> None:
    df = df.assign(linear_top1=float("nan"), linear_best_lr=float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_report(df, tmp_path)
    assert (tmp_path / "summary.png") in paths
    assert comparison_table(df).loc["dino", ("resnet18", "linear")] == "–"
