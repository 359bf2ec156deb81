"""Stopping a run on a signal without losing it: the loop's checkpoint and stop (and an exact resume from
it), and the command line's exit status and resume command. The handler's own rules are in
test_stop_signals.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_resume import PAIR, RUN, _env, _newest_iteration
from test_stop_signals import _send
from tiny_pair import tiny_byol_pair

from sslbench import Method
from sslbench.config import TrainConfig
from sslbench.training.checkpoint import Checkpointing, checkpoint_files, load_latest_checkpoint
from sslbench.training.interrupt import (
    RunInterrupted,
    stop_on_signals,
    stop_requested,
    training_section,
)
from sslbench.training.loop import train_loop
from sslbench.training.step import device_views

# --------------------------------------------------------------------------------------------------------
# The loop: the step in progress finishes, a checkpoint is written, the run stops; resuming it is exact
# --------------------------------------------------------------------------------------------------------

EPOCHS, IPE = 2, 2  # 8 images, batches of 4


def _train(
    pair_dir: Path,
    resume: bool = False,
    monitor_hook: Callable[[int], None] | None = None,
    views_hook: Callable[[int], None] | None = None,
) -> Method:
    """A tiny BYOL pair through ``train_loop`` as ``train_pair`` runs it: inside ``stop_on_signals()`` and
    ``training_section("pair")``, a checkpoint every epoch and none on time, a monitor every epoch (the
    weights' sum, so its record tells where it was taken). The hooks get the call's number in this session
    (the monitor's, and ``make_views``'s, which runs at the start of each step)."""
    method, loader = tiny_byol_pair(EPOCHS)
    calls = {"monitor": 0, "views": 0}

    def monitor() -> dict[str, float]:
        if monitor_hook is not None:
            monitor_hook(calls["monitor"])
        calls["monitor"] += 1
        return {"weights": float(sum(p.detach().double().sum() for p in method.backbone.parameters()))}

    move = device_views(torch.device("cpu"), torch.contiguous_format)

    def make_views(batch):
        if views_hook is not None:
            views_hook(calls["views"])
        calls["views"] += 1
        return move(batch)

    train_cfg = TrainConfig(epochs=EPOCHS, batch_size=4, log_every=1, keep_checkpoints=2)
    checkpointing = Checkpointing(pair_dir, "hash", every_epochs=1, every_minutes=0, keep=2, resume=resume)
    cpu = torch.device("cpu")
    with stop_on_signals(), training_section("pair"):
        train_loop(
            method,
            loader,
            train_cfg,
            "fp32",
            cpu,
            pair_dir,
            False,
            monitor,
            monitor_every=1,
            make_views=make_views,
            checkpointing=checkpointing,
        )
    return method


def _signal_at(wanted: int, signum: int = signal.SIGINT) -> Callable[[int], None]:
    def hook(call: int) -> None:
        if call == wanted:
            _send(signum)

    return hook


def _records(pair_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (pair_dir / "metrics.jsonl").read_text().splitlines()]


def _essentials(records: list[dict]) -> list[tuple]:
    """What must not depend on an interruption: which records, in which order, with which numbers (the
    clocks aside)."""
    return [(r["kind"], r["epoch"], r.get("iteration"), r.get("loss"), r.get("weights")) for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict[str, torch.Tensor], list[dict]]:
    pair_dir = tmp_path_factory.mktemp("whole")
    method = _train(pair_dir)
    return method.state_dict(), _records(pair_dir)


def _assert_same_run(method: Method, pair_dir: Path, uninterrupted) -> None:
    weights, records = uninterrupted
    state = method.state_dict()
    assert state.keys() == weights.keys()
    for name, value in weights.items():
        assert torch.equal(state[name], value), name
    assert _essentials(_records(pair_dir)) == _essentials(records)


def test_a_signal_mid_epoch_saves_after_the_step_and_the_resume_is_exact(tmp_path, uninterrupted):
    pair_dir = tmp_path / "pair"
    with pytest.raises(RunInterrupted) as stop:  # Ctrl-C during the epoch-0 monitor, before any step
        _train(pair_dir, monitor_hook=_signal_at(0))
    saved = pair_dir / "checkpoints"
    assert str(stop.value) == f"pair stopped after 1 completed iteration; checkpoint saved in {saved}"
    assert stop.value.exit_status == 130 and stop_requested() is None
    assert [f.name for f in checkpoint_files(pair_dir)] == ["iter-00000001.pt"]  # mid-epoch 0
    records = _records(pair_dir)
    assert _essentials(records) == _essentials(uninterrupted[1][:2])  # the monitor and the one step
    assert load_latest_checkpoint(pair_dir, "hash")["records"] == records

    resumed = _train(pair_dir, resume=True)
    _assert_same_run(resumed, pair_dir, uninterrupted)


def test_a_signal_in_an_epochs_last_step_stops_after_the_epochs_own_work(tmp_path, uninterrupted):
    pair_dir = tmp_path / "pair"
    with pytest.raises(RunInterrupted) as stop:
        _train(pair_dir, views_hook=_signal_at(IPE - 1, signal.SIGTERM))  # in epoch 0's last step
    assert f"stopped after {IPE} completed iterations;" in str(stop.value) and stop.value.exit_status == 143
    assert [f.name for f in checkpoint_files(pair_dir)] == [f"iter-{IPE:08d}.pt"]  # at the epoch's end
    records = _records(pair_dir)
    assert records[-1]["kind"] == "monitor" and records[-1]["epoch"] == 1  # epoch 0's monitor ran
    assert _essentials(records) == _essentials(uninterrupted[1][: len(records)])
    assert load_latest_checkpoint(pair_dir, "hash")["records"] == records

    resumed = _train(pair_dir, resume=True)  # the epoch-1 monitor is not taken again
    _assert_same_run(resumed, pair_dir, uninterrupted)


def test_a_second_signal_in_the_loop_stops_at_once_without_a_checkpoint(tmp_path):
    pair_dir = tmp_path / "pair"
    with pytest.raises(RunInterrupted, match="stopped at once") as stop:  # the first step never ran
        _train(pair_dir, monitor_hook=_signal_at(0), views_hook=_signal_at(0))
    assert stop.value.exit_status == 130 and stop_requested() is None
    assert checkpoint_files(pair_dir) == []
    assert [r["kind"] for r in _records(pair_dir)] == ["monitor"]  # what led up to the stop is kept


# --------------------------------------------------------------------------------------------------------
# The command line: Ctrl-C to the process group, exit status 130, the resume command, and that command
# --------------------------------------------------------------------------------------------------------

STEPS = 5  # one epoch of 5 steps; no checkpoint but the signal's and the final one
INTERRUPTED_ARGS = [
    *(
        a
        for a in RUN[3:]
        if a != "--no-progress"  # the progress bar says when the first step is done
        and not a.startswith(("--epochs=", "--set=train.checkpoint_every_minutes="))
    ),
    "--epochs=1",
    "--set=train.checkpoint_every_minutes=0",
]


def _read_all(stream, chunks: list[bytes]) -> None:
    while chunk := os.read(stream.fileno(), 65536):
        chunks.append(chunk)


def test_ctrl_c_saves_prints_the_resume_command_and_that_command_finishes_the_run(tmp_path):
    out = tmp_path / "run"
    assert RUN[:3] == [sys.executable, "-m", "sslbench"] and INTERRUPTED_ARGS[0] == "run"
    process = subprocess.Popen(  # a session of its own: Ctrl-C in a terminal signals the whole group
        [*RUN[:3], *INTERRUPTED_ARGS, f"--out={out}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
        start_new_session=True,
    )
    chunks: list[bytes] = []
    reader = threading.Thread(target=_read_all, args=(process.stderr, chunks), daemon=True)
    reader.start()
    step_done = re.compile(rb"\| *[1-9]\d*/%d \[" % STEPS)  # the bar past its first step
    deadline = time.monotonic() + 180
    while not step_done.search(b"".join(chunks)) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert process.poll() is None, "the run ended before it could be interrupted"
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    reader.join(timeout=10)
    stderr = b"".join(chunks).decode()

    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "sslbench: SIGINT: finishing this step and saving a checkpoint" in stderr
    folder = out / PAIR / "checkpoints"
    interrupted = re.search(
        rf"sslbench: interrupted: {PAIR} stopped after (\d+) completed iterations?; checkpoint saved in "
        rf"{re.escape(str(folder))}\. Finished pairs are kept in {re.escape(str(out))}; to go on from the "
        r"newest checkpoints:\n  (.*)\n",
        stderr,
    )
    assert interrupted, stderr[-3000:]
    stopped_at, command = int(interrupted[1]), interrupted[2]
    assert 1 <= stopped_at <= STEPS
    assert command == shlex.join(["sslbench", *INTERRUPTED_ARGS, "--out", str(out), "--resume"])
    assert [f.name for f in checkpoint_files(out / PAIR)] == [f"iter-{stopped_at:08d}.pt"]
    assert _newest_iteration(out) == stopped_at
    trained = [r["iteration"] for r in _records(out / PAIR) if r["kind"] == "train"]
    assert trained == list(range(stopped_at))  # the step in progress finished, no other began
    assert not (out / PAIR / "eval.json").exists()

    argv = shlex.split(command)
    resumed = subprocess.run([*RUN[:3], *argv[1:]], capture_output=True, text=True, env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    evaluated = json.loads((out / PAIR / "eval.json").read_text())
    assert evaluated["status"] == "ok" and evaluated["train"]["resumed_at"] == stopped_at
    assert evaluated["train"]["iterations"] == STEPS
    trained = [r["iteration"] for r in _records(out / PAIR) if r["kind"] == "train"]
    assert trained == list(range(STEPS))
