"""The DINO paper's linear evaluation: reference transforms, a frozen backbone, one forward feeding one
head per lr, a per-epoch cosine to zero, the lr chosen on held-out train images, repeatable runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torchvision.transforms import InterpolationMode

from sslbench.base.errors import SSLBenchError
from sslbench.data.datasets import ArraySource
from sslbench.evaluation.linear_paper import (
    DINOV2_LR_GRID,
    PaperLinearResult,
    paper_linear_evaluation,
    paper_test_transform,
    paper_train_transform,
)
from sslbench.evaluation.linear_probe import holdout_split
from sslbench.models.backbones import Backbone, create_backbone

SIZE, CLASSES, EPOCHS, BATCH = 16, 3, 3, 8
LRS = (1e-4, 0.1, 1.0)  # 1e-4 is too small to learn anything in a few steps
VAL_FRACTION = 0.25
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def colour_source(n: int, seed: int) -> ArraySource:
    """Noisy images whose class is their dominant colour channel: easy for any frozen network."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    images = rng.integers(0, 80, size=(n, SIZE, SIZE, 3))
    images[np.arange(n), :, :, labels] += 150
    return ArraySource(images.astype(np.uint8), labels)


TRAIN, TEST = colour_source(40, seed=0), colour_source(24, seed=1)


def evaluate(backbone: Backbone, **overrides: Any) -> PaperLinearResult:
    options: dict[str, Any] = dict(
        image_size=SIZE, mean=MEAN, std=STD, epochs=EPOCHS, lrs=LRS, batch_size=BATCH,
        val_fraction=VAL_FRACTION, seed=0,
    )  # fmt: skip
    return paper_linear_evaluation(backbone, TRAIN, TEST, CLASSES, **(options | overrides))


@dataclass
class Observed:
    """What one evaluation did, seen from outside: events in order, lrs and params of every step."""

    result: PaperLinearResult
    backbone: Backbone
    weights_before: dict[str, torch.Tensor]
    events: list[str] = field(default_factory=list)  # "forward" | "step"
    forward_checks: list[tuple[bool, bool, torch.dtype | None]] = field(
        default_factory=list
    )  # grad, mode, autocast
    step_lrs: list[list[float]] = field(default_factory=list)
    step_params: list[list[tuple[torch.dtype, tuple[int, ...]]]] = field(default_factory=list)


def observe(arch: str, **overrides: Any) -> Observed:
    """Run one evaluation with the backbone's forward and every optimizer step watched."""
    torch.manual_seed(0)
    backbone = create_backbone(arch, SIZE)
    backbone.train()  # the evaluation must switch it to eval mode itself, and switch it back
    observed = Observed(None, backbone, {k: v.clone() for k, v in backbone.state_dict().items()})  # type: ignore[arg-type]
    forward_eval = backbone.forward_eval

    def watched_forward(images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = forward_eval(images)
        observed.events.append("forward")
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        observed.forward_checks.append((torch.is_grad_enabled(), backbone.training, autocast))
        return out

    def watch_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        observed.events.append("step")
        observed.step_lrs.append([group["lr"] for group in optimizer.param_groups])
        observed.step_params.append(
            [(p.dtype, tuple(p.shape)) for group in optimizer.param_groups for p in group["params"]]
        )

    backbone.forward_eval = watched_forward  # type: ignore[method-assign]
    handle = register_optimizer_step_pre_hook(watch_step)
    try:
        observed.result = evaluate(backbone, **overrides)
    finally:
        handle.remove()
    return observed


@pytest.fixture(scope="module")
def resnet_run() -> Observed:
    return observe("resnet18")


def _split_sizes(val_fraction: float) -> tuple[int, int]:
    labels = torch.as_tensor(TRAIN.labels)
    fit, val = holdout_split(labels, val_fraction, torch.Generator().manual_seed(0))
    return fit.numel(), val.numel()


def test_transforms_are_the_references() -> None:
    """eval_linear.py: RandomResizedCrop(224) + flip for training; Resize(256, bicubic) + CenterCrop(224)."""
    train = paper_train_transform(224, MEAN, STD).transforms
    assert [type(t) for t in train] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    crop = train[0]
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3)) and crop.interpolation == InterpolationMode.BILINEAR
    assert train[1].p == 0.5 and (train[3].mean, train[3].std) == (MEAN, STD)
    test = paper_test_transform(224, MEAN, STD).transforms
    assert [type(t) for t in test] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert test[0].size == 256 and test[0].interpolation == InterpolationMode.BICUBIC
    assert test[1].size == (224, 224) and (test[3].mean, test[3].std) == (MEAN, STD)
    small = paper_test_transform(32, MEAN, STD).transforms
    assert small[0].size == round(32 * 256 / 224) == 37 and small[1].size == (32, 32)
    assert paper_train_transform(32, MEAN, STD).transforms[0].size == (32, 32)


def test_the_backbone_is_frozen_in_eval_mode_and_left_as_found(resnet_run: Observed) -> None:
    backbone = resnet_run.backbone
    after = backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in resnet_run.weights_before.items())  # incl. BN stats
    assert all(p.grad is None for p in backbone.parameters())
    assert resnet_run.forward_checks and all(
        check == (False, False, None) for check in resnet_run.forward_checks
    )  # no graph, eval mode, fp32
    assert backbone.training  # its mode is restored


def test_one_forward_per_batch_trains_every_head(resnet_run: Observed) -> None:
    n_fit, n_val = _split_sizes(VAL_FRACTION)
    steps = EPOCHS * math.ceil(n_fit / BATCH)
    eval_forwards = math.ceil(n_val / BATCH) + math.ceil(len(TEST) / BATCH)
    assert resnet_run.events == ["forward", "step"] * steps + ["forward"] * eval_forwards
    dim = resnet_run.backbone.linear_dim
    head = [(torch.float32, (CLASSES, dim)), (torch.float32, (CLASSES,))]
    assert all(params == head * len(LRS) for params in resnet_run.step_params)


def test_lr_is_scaled_by_batch_and_follows_a_per_epoch_cosine_to_zero(resnet_run: Observed) -> None:
    steps_per_epoch = math.ceil(_split_sizes(VAL_FRACTION)[0] / BATCH)
    for step, lrs in enumerate(resnet_run.step_lrs):
        factor = 0.5 * (1 + math.cos(math.pi * (step // steps_per_epoch) / EPOCHS))
        assert lrs == pytest.approx([lr * BATCH / 256 * factor for lr in LRS], rel=1e-9)
    assert resnet_run.step_lrs[0] == pytest.approx([lr * BATCH / 256 for lr in LRS])


def test_the_lr_is_chosen_on_held_out_train_and_its_head_is_tested(resnet_run: Observed) -> None:
    result = resnet_run.result
    assert sorted(result.val_top1) == list(LRS)
    assert result.best_lr == max(LRS, key=lambda lr: (result.val_top1[lr], -lr))
    assert result.val_top1[result.best_lr] > result.val_top1[1e-4]
    preds = result.test_predictions
    assert preds.dtype == torch.int64 and preds.device.type == "cpu" and preds.shape == (len(TEST),)
    assert result.top1 == pytest.approx(100.0 * (preds.numpy() == TEST.labels).mean())
    assert result.epochs == EPOCHS
    assert "25% of train held out" in result.description and "not retrained" in result.description


def test_an_easy_task_is_learned(resnet_run: Observed) -> None:
    assert resnet_run.result.top1 >= 90.0


def test_a_run_repeats_exactly_for_a_seed(resnet_run: Observed) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", SIZE)  # the same weights as the fixture's
    torch.manual_seed(123)  # the global random state must not matter
    again = evaluate(backbone)
    assert torch.equal(again.test_predictions, resnet_run.result.test_predictions)
    assert again.val_top1 == resnet_run.result.val_top1 and again.best_lr == resnet_run.result.best_lr


def test_vit_last_four_class_tokens_in_bf16_feed_fp32_heads_and_one_lr_uses_all_of_train() -> None:
    run = observe("vit_tiny16", epochs=1, lrs=(0.1,), precision="bf16")
    dim = run.backbone.linear_dim
    assert dim == 4 * run.backbone.feat_dim
    assert all(dtype == torch.bfloat16 for _, _, dtype in run.forward_checks)
    assert run.step_params[0] == [(torch.float32, (CLASSES, dim)), (torch.float32, (CLASSES,))]
    assert run.events.count("step") == math.ceil(len(TRAIN) / BATCH)  # nothing held out
    assert run.result.val_top1 == {} and run.result.best_lr == 0.1
    assert "on all of train" in run.result.description


def test_the_default_sweep_is_dinov2s_grid() -> None:
    assert DINOV2_LR_GRID == (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lrs": ()}, "at least one lr"),
        ({"lrs": (0.1, -1.0)}, "at least one lr"),
        ({"epochs": 0}, "epochs >= 1"),
        ({"val_fraction": 1.0}, "val_fraction < 1"),
        ({"precision": "fp16"}, "unknown precision 'fp16'"),
        ({"val_fraction": 0.0}, "leaves nothing held out"),
    ],
)
def test_bad_arguments_say_what_to_change(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(SSLBenchError, match=message):
        evaluate(create_backbone("resnet18", SIZE), **overrides)


def test_labels_outside_the_classes_are_refused() -> None:
    two_classes = ArraySource(TRAIN.images[TRAIN.labels < 2], TRAIN.labels[TRAIN.labels < 2])
    with pytest.raises(SSLBenchError, match=r"test labels must lie in \[0, 2\); got 0..2"):
        paper_linear_evaluation(
            create_backbone("resnet18", SIZE), two_classes, TEST, 2, image_size=SIZE, mean=MEAN, std=STD
        )
