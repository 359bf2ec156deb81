"""Ablations from the outside: --vary, the choice of variants, the table, and a tiny run end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from cli_session import run_cli as _main

from sslbench.base.errors import SSLBenchError
from sslbench.config import RunConfig, config_to_dict, resolve_config
from sslbench.method.registry import get_method, list_methods
from sslbench.reporting.tables import load_results
from sslbench.training.ablation import (
    ablation_table,
    dino_variants,
    variants_for,
    vary_variants,
    write_ablation_table,
)
from sslbench.training.experiment import Variant
from sslbench.training.runner import PairPlan, plan_pair

ARCH = "vit_tiny16"
NAMES = ["full", "no_centering", "no_sharpening", "no_momentum_teacher", "mse_loss", "with_predictor",
         "no_multicrop"]  # fmt: skip


def _plan(variant: Variant) -> PairPlan:
    """The variant's pair plan, resolved exactly as run_benchmark resolves it."""
    config = resolve_config([config_to_dict(RunConfig()), variant.overrides], list(list_methods()))
    return plan_pair(get_method("dino"), ARCH, config, torch.device("cpu"), 32)


# --- --vary and the choice of variants -----------------------------------------------------------------


def test_vary_gives_one_variant_per_value() -> None:
    variants = vary_variants(["dino.teacher_temp=0.04,0.07"])
    assert variants == [
        Variant("teacher_temp=0.04", {"dino": {"teacher_temp": 0.04}}),
        Variant("teacher_temp=0.07", {"dino": {"teacher_temp": 0.07}}),
    ]
    both = vary_variants(["train.lr=1e-3, 2e-3", "dino.predictor=true,false"])
    assert [v.name for v in both] == ["lr=1e-3", "lr=2e-3", "predictor=true", "predictor=false"]
    assert [v.overrides for v in both] == [
        {"train": {"lr": 1e-3}},
        {"train": {"lr": 2e-3}},
        {"dino": {"predictor": True}},
        {"dino": {"predictor": False}},
    ]
    for variant in variants:
        plan = _plan(variant)
        assert plan.method_options.teacher_temp == variant.overrides["dino"]["teacher_temp"]


@pytest.mark.parametrize("assignment", ["dino.teacher_temp", "dino.teacher_temp=", ""])
def test_malformed_vary_is_an_error(assignment: str) -> None:
    with pytest.raises(SSLBenchError, match=r"--vary expects key=v1,v2"):
        vary_variants([assignment])


def test_vary_overrides_the_built_in_table_and_other_methods_need_it() -> None:
    config = RunConfig()
    names = [v.name for v in variants_for("dino", config, ["dino.out_dim=64,128"])]
    assert names == ["out_dim=64", "out_dim=128"]
    assert [v.name for v in variants_for("byol", config, ["byol.proj_dim=64"])] == ["proj_dim=64"]
    with pytest.raises(SSLBenchError, match=r"no built-in ablation for 'byol'.*--vary byol\.KEY=v1,v2"):
        variants_for("byol", config, [])


def test_ablate_without_a_table_or_vary_fails_before_training(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, _, stderr = _main(["ablate", "byol", "--arch", ARCH, "--out", str(out), "--no-progress"])
    assert code == 2
    assert "no built-in ablation for 'byol'" in stderr and "--vary" in stderr and "Traceback" not in stderr
    assert not out.exists()


# --- the table --------------------------------------------------------------------------------------------


def _fake_eval(variant: str, index: int, **changes: Any) -> dict[str, Any]:
    record = {
        "method": "dino",
        "arch": ARCH,
        "variant": variant,
        "status": "ok",
        "error": None,
        "knn": {"10": 10.0 + index, "20": 20.0 + index, "100": 30.0, "200": 40.0},
        "linear": {"top1": 50.0 + index, "best_lr": 0.1},
        "train": {"wall_s": 1.0, "images_per_s": 2.0, "final_loss": 3.0},
        "collapse": {
            "collapsed": variant == "no_centering",
            "reasons": ["uniform collapse: ..."] if variant == "no_centering" else [],
            "embedding_std": 0.01 * (index + 1),
            "embedding_std_healthy": 0.125,
            "effective_rank": 5.0 + index,
            "teacher_entropy": 4.0,
            "teacher_student_kl": 0.5,
        },
        "protocol": {"knn_k": 20, "epochs": 1, "seed": 0, "dataset": "embedded"},
    }
    return record | changes


def _fake_run(run: Path, records: list[dict[str, Any]]) -> pd.DataFrame:
    for record in reversed(records):  # written backwards: the table must not depend on folder order
        folder = run / f"dino@{record['variant']}-{ARCH}"
        folder.mkdir(parents=True)
        (folder / "eval.json").write_text(json.dumps(record), encoding="utf-8")
    return load_results([run])


def test_ablation_table_rows_follow_the_variants(tmp_path: Path) -> None:
    variants = dino_variants(RunConfig())
    records = [_fake_eval(name, i) for i, name in enumerate(NAMES)]
    del records[2]["collapse"]["teacher_entropy"]  # e.g. a diagnostic that was not logged
    results = _fake_run(tmp_path / "run", records)
    assert list(results["variant"]) != NAMES  # load order is by folder name ...
    table = ablation_table(results, variants)
    assert list(table["variant"]) == NAMES  # ... the table's is the variants'
    assert list(table["k-NN"]) == [20.0 + i for i in range(7)]
    assert list(table["linear"]) == [50.0 + i for i in range(7)]
    assert list(table["collapsed"]) == [name == "no_centering" for name in NAMES]
    assert list(table["embedding_std_ratio"]) == pytest.approx([0.08 * (i + 1) for i in range(7)])
    assert list(table["effective_rank"]) == [5.0 + i for i in range(7)]
    overrides = dict(zip(table["variant"], table["override"], strict=True))
    assert overrides["full"] == "(none)"
    assert overrides["no_centering"] == "dino.center_momentum=1.0"
    assert overrides["no_momentum_teacher"] == "train.ema_momentum=0.0, train.ema_momentum_end=0.0"

    text = write_ablation_table(table, results, tmp_path, "dino")
    assert text == (tmp_path / "ablation.md").read_text(encoding="utf-8")
    assert text.startswith("# Ablation of dino")
    rows = [line for line in text.splitlines() if line.startswith("| ") and ARCH in line]
    assert [row.split("|")[1].strip() for row in rows] == NAMES
    assert "| –" in rows[2] and " yes " in rows[1] and " no " in rows[0]
    assert "Protocol:" in text and "- knn_k: 20" in text
    assert "not the reference's eval_linear.py" in text
    csv = pd.read_csv(tmp_path / "ablation.csv")
    assert list(csv["variant"]) == NAMES
    assert list(csv["k-NN"]) == [20.0 + i for i in range(7)]


def test_ablation_table_reads_the_headline_k(tmp_path: Path) -> None:
    records = [_fake_eval("full", 0, protocol={"knn_k": 10})]
    table = ablation_table(_fake_run(tmp_path / "run", records), dino_variants(RunConfig()))
    assert list(table["k-NN"]) == [10.0]


def test_ablation_table_keeps_a_failed_variant(tmp_path: Path) -> None:
    failed = {"method": "dino", "arch": ARCH, "variant": "no_centering", "status": "failed",
              "error": "loss became nan", "knn": None, "linear": None, "train": None,
              "protocol": {"recipe": "shared", "seed": 0}}  # fmt: skip
    results = _fake_run(tmp_path / "run", [_fake_eval("full", 0), failed])
    table = ablation_table(results, dino_variants(RunConfig()))
    assert list(table["variant"]) == ["full", "no_centering"]
    assert list(table["status"]) == ["ok", "failed"]
    assert pd.isna(table["k-NN"][1])
    write_ablation_table(table, results, tmp_path, "dino")


# --- a tiny ablation end to end ------------------------------------------------------------------------

TINY_ABLATION = [
    "--vary", "dino.teacher_temp=0.04,0.1", "--epochs", "1", "--batch-size", "8", "--no-progress",
    "--set", "train.train_per_class=2", "--set", "eval.train_per_class=3", "--set", "eval.test_per_class=2",
    "--set", "eval.linear_epochs=2", "--set", "eval.monitor_bank_per_class=2",
    "--set", "eval.monitor_test_per_class=1", "--set", "dino.out_dim=64", "--set", "dino.hidden_dim=64",
    "--set", "dino.local_crops_number=1", "--set", "train.save_weights=false",
]  # fmt: skip


def test_tiny_ablation_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    code, stdout, stderr = _main(["ablate", "dino", "--arch", ARCH, "--out", str(out), *TINY_ABLATION])
    assert code == 0, stderr
    assert "Traceback" not in stderr
    names = ["teacher_temp=0.04", "teacher_temp=0.1"]

    csv = pd.read_csv(out / "ablation.csv")
    assert list(csv["variant"]) == names
    assert list(csv["override"]) == ["dino.teacher_temp=0.04", "dino.teacher_temp=0.1"]
    assert list(csv["status"]) == ["ok", "ok"]
    assert csv["k-NN"].between(0, 100).all() and csv["linear"].between(0, 100).all()
    markdown = (out / "ablation.md").read_text(encoding="utf-8")
    assert markdown in stdout
    rows = [line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| teacher_temp")]
    assert rows == names

    for name, temp in zip(names, (0.04, 0.1), strict=True):
        pair = out / f"dino@{name}-{ARCH}"
        record = json.loads((pair / "eval.json").read_text(encoding="utf-8"))
        assert (record["variant"], record["status"]) == (name, "ok")
        assert record["method_options"]["teacher_temp"] == temp
        assert isinstance(record["collapse"]["collapsed"], bool)
        assert {"reasons", "embedding_std", "effective_rank", "teacher_entropy"} <= set(record["collapse"])
        lines = [json.loads(line) for line in (pair / "metrics.jsonl").read_text().splitlines()]
        train_lines = [r for r in lines if r["kind"] == "train"]
        assert train_lines and all(r["teacher_temp"] == pytest.approx(temp) for r in train_lines)
        assert not (pair / "backbone.pt").exists()
    for picture in ("curves.png", "collapse.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
