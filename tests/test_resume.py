"""Never lose a run: a killed run resumes to the uninterrupted run's numbers; an unreadable checkpoint
falls back to the previous one; checkpoints hold only plain data."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_pair import tiny_byol_pair

from sslbench.training.checkpoint import (
    checkpoint_files,
    load_latest_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)

RUN = [
    sys.executable,
    "-m",
    "sslbench",
    "run",
    "--methods=dino",
    "--arch=vit_tiny16",  # drop-path on: the restored generator matters
    "--epochs=2",
    "--batch-size=8",
    "--device=cpu",
    "--no-progress",
    "--set=train.train_per_class=4",  # 40 images: 5 steps an epoch
    "--set=train.log_every=1",
    "--set=train.checkpoint_every_minutes=1e-9",  # a checkpoint at every logged step
    "--set=train.keep_checkpoints=3",
    "--set=eval.monitor_bank_per_class=2",
    "--set=eval.monitor_test_per_class=2",
    "--set=eval.train_per_class=10",
    "--set=eval.test_per_class=5",
    "--set=eval.linear_epochs=5",
    "--set=dino.out_dim=64",
    "--set=dino.hidden_dim=64",
    "--set=dino.local_crops_number=2",
]
PAIR = "dino-vit_tiny16"


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def _newest_iteration(out: Path) -> int:
    files = checkpoint_files(out / PAIR)
    return int(files[-1].stem.split("-")[1]) if files else 0


def test_killed_run_resumes_to_the_uninterrupted_numbers(tmp_path, uninterrupted_dino_run):
    whole, killed = uninterrupted_dino_run, tmp_path / "killed"

    process = subprocess.Popen([*RUN, f"--out={killed}"], env=_env(), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while _newest_iteration(killed) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # mid-epoch 0 (5 steps an epoch), no chance to clean up
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = _newest_iteration(killed)
    assert 3 <= stopped_at < 10 and not (killed / PAIR / "eval.json").exists()

    refused = subprocess.run([*RUN, f"--out={killed}"], capture_output=True, text=True, env=_env())
    assert refused.returncode == 2 and "--resume" in refused.stderr and "Traceback" not in refused.stderr
    resumed = subprocess.run(
        [*RUN, f"--out={killed}", "--resume"], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    weights = [torch.load(run / PAIR / "backbone.pt", weights_only=True) for run in (whole, killed)]
    for key, value in weights[0].items():
        assert torch.equal(weights[1][key], value), key
    evals = [json.loads((run / PAIR / "eval.json").read_text()) for run in (whole, killed)]
    assert evals[1]["knn"] == evals[0]["knn"] and evals[1]["linear"] == evals[0]["linear"]
    assert evals[1]["train"]["resumed_at"] == stopped_at
    metrics = [
        [json.loads(line) for line in (run / PAIR / "metrics.jsonl").read_text().splitlines()]
        for run in (whole, killed)
    ]
    assert [m.get("loss") for m in metrics[1]] == [m.get("loss") for m in metrics[0]]
    assert [m.get("knn_teacher") for m in metrics[1]] == [m.get("knn_teacher") for m in metrics[0]]


def _train(out: Path, resume: bool) -> torch.nn.Module:
    from sslbench.config import TrainConfig
    from sslbench.training.checkpoint import Checkpointing
    from sslbench.training.loop import train_loop

    method, loader = tiny_byol_pair(epochs=3)
    train_cfg = TrainConfig(epochs=3, batch_size=4, log_every=1, keep_checkpoints=2)
    checkpointing = Checkpointing(out, "hash", every_epochs=1, every_minutes=0, keep=2, resume=resume)
    train_loop(
        method, loader, train_cfg, "fp32", torch.device("cpu"), out, False, checkpointing=checkpointing
    )
    return method


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    reference = _train(tmp_path, resume=False)
    files = checkpoint_files(tmp_path)
    assert [f.name for f in files] == ["iter-00000004.pt", "iter-00000006.pt"]  # the newest 2 kept
    files[-1].write_bytes(files[-1].read_bytes()[:1000])  # a crash mid-write of a non-atomic copy
    with pytest.warns(UserWarning, match="iter-00000006.pt cannot be read.*falling back"):
        payload = load_latest_checkpoint(tmp_path, "hash")
    assert payload is not None and payload["iteration"] == 4
    with pytest.warns(UserWarning, match="falling back"):
        resumed = _train(tmp_path, resume=True)  # retrains the last epoch from iteration 4
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_another_config_is_never_used(tmp_path):
    save_checkpoint(tmp_path, {"iteration": 3, "config_hash": "old"}, keep=2)
    with pytest.warns(UserWarning, match="another config"):
        assert load_latest_checkpoint(tmp_path, "new") is None


def test_checkpoints_load_without_executing_code(tmp_path):
    path = save_checkpoint(tmp_path, {"iteration": 1, "config_hash": "h", "rng": rng_state()}, keep=1)
    payload = torch.load(path, weights_only=True)  # would refuse any pickled object
    assert payload["iteration"] == 1 and payload["format"] == 1


def test_rng_state_round_trip_restores_every_generator():
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    restore_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_rng_state_includes_an_augmentation_generator():
    generator = torch.Generator().manual_seed(5)
    state = rng_state(generator)
    expected = torch.rand(4, generator=generator)
    restore_rng_state(state, generator)
    assert torch.equal(torch.rand(4, generator=generator), expected)


def test_checkpoints_newer_than_a_resume_point_are_dropped(tmp_path):
    """After resuming from 4 past an unreadable 6, the stale 6 must not hold one of the kept slots."""
    for iteration in (2, 4, 6):
        save_checkpoint(tmp_path, {"iteration": iteration, "config_hash": "h"}, keep=3)
    save_checkpoint(tmp_path, {"iteration": 5, "config_hash": "h"}, keep=2)
    assert [f.name for f in checkpoint_files(tmp_path)] == ["iter-00000004.pt", "iter-00000005.pt"]
