"""The same ``sslbench run`` command, typed twice, prints the same numbers; another ``--seed`` does not.

Through the front door: each run is its own process, seeded only by the config's seed, at the machine's
auto precision, with a DINO ViT (multi-crop, EMA teacher, monitor) and a SimCLR ResNet (BatchNorm,
negatives) pair, so every source of randomness a run has is exercised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMAND = [
    sys.executable, "-m", "sslbench", "run", "--methods", "dino,simclr", "--arch", "vit_tiny16,resnet18",
    "--epochs", "1", "--batch-size", "8", "--no-progress",
    "--set", "train.train_per_class=2", "--set", "eval.train_per_class=3", "--set", "eval.test_per_class=2",
    "--set", "eval.monitor_bank_per_class=2", "--set", "eval.monitor_test_per_class=1",
    "--set", "eval.linear_epochs=3", "--set", "train.warmup_epochs=0", "--set", "train.log_every=1",
    "--set", "dino.out_dim=64", "--set", "dino.hidden_dim=64", "--set", "dino.local_crops_number=1",
    "--set", "simclr.proj_hidden_dim=64",
]  # fmt: skip
PAIRS = ["dino-vit_tiny16", "simclr-resnet18"]
TIMING = ("_s", "images_per_s")  # wall-clock keys, the only ones allowed to differ


def _run(out: Path, *extra: str) -> None:
    env = os.environ | {"MPLBACKEND": "Agg"}
    done = subprocess.run([*COMMAND, *extra, "--out", str(out)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def _numbers(value: object) -> object:
    """An eval.json or metrics record without its wall-clock times."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items() if not k.endswith(TIMING)}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def _results(out: Path, pair: str) -> tuple[object, object]:
    record = json.loads((out / pair / "eval.json").read_text(encoding="utf-8"))
    lines = (out / pair / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return _numbers(record), _numbers([json.loads(line) for line in lines])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repeat")
    folders = {"first": root / "first", "again": root / "again", "seed1": root / "seed1"}
    _run(folders["first"])
    _run(folders["again"])
    _run(folders["seed1"], "--seed", "1")
    return folders


@pytest.mark.parametrize("pair", PAIRS)
def test_the_same_command_twice_gives_the_same_numbers(runs: dict[str, Path], pair: str) -> None:
    first, again = _results(runs["first"], pair), _results(runs["again"], pair)
    assert first[0]["status"] == "ok" and first[0]["knn"]
    assert first == again  # eval.json (k-NN, linear, losses, diagnostics, protocol) and every log line


@pytest.mark.parametrize("pair", PAIRS)
def test_another_seed_gives_other_numbers(runs: dict[str, Path], pair: str) -> None:
    first, other = _results(runs["first"], pair), _results(runs["seed1"], pair)
    assert first[0]["train"]["final_loss"] != other[0]["train"]["final_loss"]
    assert other[0]["protocol"]["seed"] == 1
