"""The runner: planning a pair (shared or paper recipe) and the one training loop (metrics, determinism,
non-finite losses)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from sslbench import Backbone, Method, SSLBenchError, Step, StepOutput, TrainContext, create_backbone
from sslbench.base.schedules import cosine_schedule
from sslbench.config import RunConfig, TrainConfig
from sslbench.data.augment import ViewRecipe, build_view_transform, two_views
from sslbench.data.datasets import ArraySource, TransformDataset
from sslbench.method.registry import get_method, list_methods
from sslbench.training.loop import train_loop
from sslbench.training.runner import plan_pair

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SIZE = 32
NUM_CLASSES = 10
METHODS = sorted(list_methods())
CPU = torch.device("cpu")
SMALL_OPTIONS = {"simclr": {"proj_hidden_dim": 64, "proj_dim": 32}, "dino": {"out_dim": 64, "hidden_dim": 64}}


def build(name: str, arch: str, epochs: int, ipe: int) -> Method:
    method_cls = get_method(name)
    context = TrainContext(epochs, ipe, NUM_CLASSES, SIZE)
    return method_cls(create_backbone(arch, SIZE), method_cls.Config(**SMALL_OPTIONS[name]), context)


# --------------------------------------------------------------------------------------------------------
# plan_pair
# --------------------------------------------------------------------------------------------------------


def test_plan_pair_validates_method_options():
    config = RunConfig(method_options={"dino": {"out_dimm": 8}})
    with pytest.raises(SSLBenchError, match="did you mean 'dino.out_dim'"):
        plan_pair(get_method("dino"), "resnet18", config, CPU)
    plan = plan_pair(get_method("dino"), "resnet18", RunConfig(method_options={"dino": {"out_dim": 8}}), CPU)
    assert plan.method_options.out_dim == 8


# --------------------------------------------------------------------------------------------------------
# The runner's loop
# --------------------------------------------------------------------------------------------------------

RUN_IMAGES, RUN_BATCH, RUN_EPOCHS = 16, 8, 2


def _train_cfg(**overrides) -> TrainConfig:
    base = {
        "epochs": RUN_EPOCHS,
        "batch_size": RUN_BATCH,
        "lr": 0.05,
        "warmup_epochs": 1,
        "log_every": 1,
        "precision": "fp32",
        "num_workers": 0,
    }
    return TrainConfig(**{**base, **overrides})


def _run(name: str, out_dir, seed: int = 0):
    torch.manual_seed(seed)
    method = build(name, "resnet18", epochs=RUN_EPOCHS, ipe=RUN_IMAGES // RUN_BATCH)
    rng = np.random.default_rng(seed)
    source = ArraySource(
        rng.integers(0, 256, (RUN_IMAGES, SIZE, SIZE, 3), dtype=np.uint8), np.arange(RUN_IMAGES) % NUM_CLASSES
    )
    dataset = TransformDataset(source, build_view_transform(method.view_recipe(), SIZE, MEAN, STD))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=RUN_BATCH,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = train_loop(method, loader, _train_cfg(), "fp32", CPU, out_dir, show_progress=False)
    return method, summary


@pytest.mark.parametrize("name", ["simclr", "dino"])
def test_train_loop_metrics_and_determinism(name, tmp_path):
    method, summary = _run(name, tmp_path / "a")
    ipe = RUN_IMAGES // RUN_BATCH
    total = RUN_EPOCHS * ipe
    assert summary["epochs"] == RUN_EPOCHS and summary["iterations"] == total
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(total))
    assert all({"iteration", "loss", "lr", "epoch"} <= set(r) for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
    lrs = cosine_schedule(0.05 * RUN_BATCH / 256, _train_cfg().min_lr, RUN_EPOCHS, ipe, 1)
    np.testing.assert_allclose([r["lr"] for r in records], lrs, rtol=1e-12)
    assert records[-1]["loss"] == summary["final_loss"]
    if name == "dino":
        assert all("teacher_temp" in r for r in records)

    again, summary_again = _run(name, tmp_path / "b")
    assert summary_again["final_loss"] == summary["final_loss"]
    state, state_again = method.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys()
    differing = [k for k in state if not torch.equal(state[k], state_again[k])]
    assert not differing, f"same seed, different weights: {differing[:5]}"


class _DivergingMethod(Method):
    """Finite loss at iteration 0, then ``bad`` from iteration 1 on."""

    bad = math.nan

    def __init__(self, backbone: Backbone, config, context: TrainContext) -> None:
        super().__init__(backbone, config, context)
        self.weight = nn.Parameter(torch.ones(1))

    def view_recipe(self) -> ViewRecipe:
        return two_views()

    def training_step(self, views: list[Tensor], labels: Tensor, step: Step) -> StepOutput:
        scale = 1.0 if step.iteration == 0 else self.bad
        return StepOutput(self.weight.sum() * scale)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_train_loop_stops_on_non_finite_loss(bad, tmp_path):
    method_cls = type("Diverging", (_DivergingMethod,), {"bad": bad})
    method = method_cls(create_backbone("resnet18", SIZE), None, TrainContext(2, 2, NUM_CLASSES, SIZE))
    data = [([torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)], 0)] * 16
    loader = torch.utils.data.DataLoader(data, batch_size=RUN_BATCH)
    with pytest.raises(SSLBenchError) as info:
        train_loop(method, loader, _train_cfg(), "fp32", CPU, tmp_path, show_progress=False)
    message = str(info.value)
    assert f"loss became {bad}" in message
    assert "iteration 1" in message and "epoch 0" in message
    assert "last finite loss 1" in message


def test_metrics_before_a_failure_are_kept(tmp_path):
    method_cls = type("Diverging", (_DivergingMethod,), {"bad": math.nan})
    method = method_cls(create_backbone("resnet18", SIZE), None, TrainContext(2, 2, NUM_CLASSES, SIZE))
    batches = [([torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)], 0)] * 16
    loader = torch.utils.data.DataLoader(batches, batch_size=8)
    with pytest.raises(SSLBenchError):
        train_loop(method, loader, _train_cfg(), "fp32", CPU, tmp_path, show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0]  # the finite step that came before the NaN
