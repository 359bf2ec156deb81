"""The device check's CPU smoke run (``--tiny``), its refusal of the full sizes on a CPU, and bench_knn.

The device check runs as a subprocess through its shell wrapper, exactly as on a GPU machine, with one
thread per process: on a few shared cores that is the fast setting for these small models.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from sslbench.base.precision import precision_choice
from sslbench.config import EvalConfig

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _run_check(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # This checkout's sslbench, whatever else is installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    command = ["bash", str(BENCHMARKS / "gpu_check.sh"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_tiny_cpu_run_passes_and_reports_every_part(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = _run_check("--device", "cpu", "--tiny", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| part | item | result | status |" in done.stdout
    expected = ("| correctness | dino vit_tiny16", "| correctness | byol resnet18", "| throughput |")
    expected += ("| memory |", "| flops |", "| peak |")
    assert all(row in done.stdout for row in expected), done.stdout
    record = json.loads(out.read_text())
    assert record["mode"] == "tiny" and record["passed"] is True
    statuses = {(row["part"], row["status"]) for row in record["rows"]}
    assert {status for part, status in statuses if part == "correctness"} == {"PASS"}
    assert not [row for row in record["rows"] if row["status"] in ("ERROR", "FAIL")], record["rows"]
    assert {part for part, _ in statuses} >= {"correctness", "peak", "throughput", "memory", "flops"}
    assert "augmentation" in {part for part, _ in statuses}  # measured, or "not available"
    assert record["matmul_peak"]["tflops"] > 0 and record["matmul_peak"]["device"] == "CPU"
    for name in ("dino", "byol"):
        result = record["throughput"][name]
        assert result["images_per_s"] > 0 and result["tflops"] > 0 and result["peak_mib"] >= 0
        assert result["precision"] == precision_choice("auto", torch.device("cpu"))[0]  # the runner's


def test_full_sizes_on_cpu_are_refused_with_a_clear_message() -> None:
    done = _run_check("--device", "cpu", timeout=60)
    assert done.returncode != 0
    assert "need a" in done.stderr and "GPU" in done.stderr and "--tiny" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_bench_knn_runs_and_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from bench_knn import bench_knn, markdown

    result = bench_knn(n_train=500, n_test=100, dim=32)
    assert result["ks"] == EvalConfig().knn_k and set(result["accuracy"]) == {str(k) for k in result["ks"]}
    assert result["seconds"] > 0 and result["peak_mib"] >= 0 and result["chunk_size"] >= 1
    assert "never the full 100 x 500" in markdown(result)
