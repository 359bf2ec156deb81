"""Where a run's time went: each pair's parts from its eval.json, the line the run ends with, and the
clocks a checkpoint carries over to a resumed session."""

from __future__ import annotations

from sslbench.cli import time_breakdown
from sslbench.training.experiment import pair_time
from sslbench.training.state import ASIDE_KINDS, TrainState


def _record(wall: float, resumed_at: int | None = None) -> dict:
    train = {
        "wall_s": wall,
        "monitor_s": 5.0,
        "checkpoint_s": 1.0,
        "logging_s": 0.5,
        "resumed_at": resumed_at,
    }
    return {"status": "ok", "train": train, "eval_s": 10.0, "total_wall_s": wall + 16.5}


def test_a_pairs_parts_come_from_its_record() -> None:
    spent = pair_time(_record(100.0))
    assert spent.parts == {"training": 100.0, "evaluation": 10.0, "monitoring": 5.0, "checkpoints": 1.0,
                           "logging": 0.5}  # fmt: skip
    assert (spent.session_s, spent.resumed, spent.failed) == (116.5, False, False)
    failed = pair_time({"status": "failed", "train": None, "total_wall_s": 7.0})
    assert failed.failed and failed.session_s == 7.0 and sum(failed.parts.values()) == 0.0
    untrained = pair_time({"status": "ok", "train": {"wall_s": 0.0}, "eval_s": 3.0, "total_wall_s": 3.5})
    assert untrained.parts["training"] == 0.0 and untrained.parts["evaluation"] == 3.0


def test_the_line_sums_the_parts_and_names_failed_and_resumed_pairs() -> None:
    timings = {
        "dino-vit_s16": pair_time(_record(100.0)),
        "byol-vit_s16": pair_time(_record(80.0, resumed_at=12)),
        "simclr-vit_s16": pair_time({"status": "failed", "train": None, "total_wall_s": 7.0}),
    }
    line = time_breakdown(timings, total=250.0)
    assert line.startswith("time: training dino-vit_s16 100 s, byol-vit_s16 80 s (with earlier sessions), ")
    assert "simclr-vit_s16 failed after 7 s; evaluation 20 s; monitoring 10 s; checkpoints 2 s;" in line
    assert line.endswith("the rest 30 s (data, set-up, reports)")  # 250 - (116.5 + 96.5 + 7) this session
    assert time_breakdown({}, 3.0) == "time: 3 s, no pair trained in this session"


def test_the_clocks_aside_survive_a_checkpoint() -> None:
    state = TrainState()
    with state.timed_aside("monitor"):
        pass
    state.aside["checkpoint"] = 2.0
    payload = state.payload()
    assert set(payload["aside_s"]) == set(ASIDE_KINDS) and payload["aside_s"]["checkpoint"] == 2.0
    resumed = TrainState(aside_before=dict(payload["aside_s"]))
    resumed.aside["checkpoint"] = 1.0
    assert resumed.aside_seconds()["checkpoint"] == 3.0
    summary = resumed.summary(epochs=1, total=4)
    assert {f"{kind}_s" for kind in ASIDE_KINDS} <= set(summary) and summary["checkpoint_s"] == 3.0
