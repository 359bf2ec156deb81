"""The fast path of training, checked on the CPU: the deferred loss guard, the data pipeline for both
augmentation paths, fused/multi-tensor optimizers, and torch.compile of the backbones."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from sslbench import SSLBenchError, Step, TrainContext, create_backbone, get_method
from sslbench.config import RunConfig, TrainConfig, resolve_config
from sslbench.data.datasets import ArraySource, DatasetSplits
from sslbench.training.optim import build_optimizer, parameter_groups
from sslbench.training.runner import compile_backbones, training_data
from sslbench.training.step import LossGuard

CPU = torch.device("cpu")


def _step(iteration: int) -> Step:
    return Step(iteration, iteration // 4, 4, 12)


def test_loss_guard_reads_pending_losses_once_and_names_the_first_bad_step():
    guard = LossGuard()
    for it, value in enumerate([2.0, 1.5]):
        guard.add(_step(it), torch.tensor(value))
    assert guard.check() == 1.5 and guard.pending == []
    for it, value in zip(range(2, 6), [1.2, math.nan, math.inf, 1.0], strict=True):
        guard.add(_step(it), torch.tensor(value))
    with pytest.raises(SSLBenchError) as info:
        guard.check()
    message = str(info.value)
    assert "loss became nan at iteration 3 (epoch 0)" in message and "last finite loss 1.2" in message
    assert "lower lr" in message


def test_loss_guard_with_nothing_pending_returns_the_last_value():
    guard = LossGuard()
    assert math.isnan(guard.check())
    guard.add(_step(0), torch.tensor(0.5))
    guard.check()
    assert guard.check() == 0.5


def _splits(size: int = 32, count: int = 40) -> DatasetSplits:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (count, size, size, 3), dtype=np.uint8)
    source = ArraySource(images, np.arange(count) % 10)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    return DatasetSplits("synthetic", source, source, [str(i) for i in range(10)], size, mean, std, "test")


@pytest.mark.parametrize("name", ["dino", "byol", "simclr"])
def test_gpu_augmentation_path_gives_the_cpu_paths_views(name):
    """Both paths hand the step the same number of views, of the same shapes and dtype."""
    data = _splits()
    method_cls = get_method(name)
    method = method_cls(create_backbone("resnet18", 32), method_cls.Config(), TrainContext(1, 5, 10, 32))
    shapes = {}
    for where in ("cpu", "gpu"):
        train_cfg = TrainConfig(batch_size=8, augment_on=where)
        loader, make_views, _ = training_data(method, data.train, data, train_cfg, seed=0, device=CPU)
        assert len(loader) == 5
        batch, labels = next(iter(loader))
        views = make_views(batch) if make_views else batch
        assert labels.shape == (8,)
        shapes[where] = [(tuple(v.shape), v.dtype) for v in views]
    assert shapes["gpu"] == shapes["cpu"]
    assert len(shapes["cpu"]) == method.view_recipe().num_views


def test_training_data_is_repeatable_and_independent_of_workers():
    data = _splits()
    method_cls = get_method("simclr")
    method = method_cls(create_backbone("resnet18", 32), method_cls.Config(), TrainContext(1, 5, 10, 32))
    batches = []
    for workers in (0, 2, 0):
        train_cfg = TrainConfig(batch_size=8, num_workers=workers)
        loader, _, _ = training_data(method, data.train, data, train_cfg, seed=3, device=CPU)
        batches.append(next(iter(loader)))
    for views, labels in batches[1:]:
        assert torch.equal(labels, batches[0][1])
        assert all(torch.equal(a, b) for a, b in zip(views, batches[0][0], strict=True))


def test_augment_on_and_compile_are_config_keys_with_checked_values():
    config = resolve_config([{"train": {"augment_on": "gpu", "compile": True}}], ["dino"])
    assert config.train.augment_on == "gpu" and config.train.compile is True
    with pytest.raises(SSLBenchError, match="train.augment_on.*did you mean 'gpu'"):
        resolve_config([{"train": {"augment_on": "gpus"}}], ["dino"])


def test_cuda_and_cpu_optimizers_are_fused_and_step_like_the_loop():
    """The fused kernel is chosen at construction; on the CPU it gives the per-parameter loop's update."""
    for name in ("adamw", "sgd"):
        cuda = build_optimizer(
            name, [{"params": [torch.nn.Parameter(torch.randn(3, 3))]}], 0.9, torch.device("cuda")
        )
        assert cuda.defaults["fused"] is True
        torch.manual_seed(0)
        fused_model = torch.nn.Linear(5, 4)
        loop_model = copy.deepcopy(fused_model)
        fused = build_optimizer(name, parameter_groups([fused_model]), 0.9, CPU)
        loop = build_optimizer(name, parameter_groups([loop_model]), 0.9)
        assert fused.defaults["fused"] is True and not loop.defaults.get("fused")
        for optimizer in (fused, loop):
            for group in optimizer.param_groups:
                group["lr"], group["weight_decay"] = 0.1, 0.05 if group["regularized"] else 0.0
        x = torch.randn(8, 5)
        for _ in range(3):
            for model, optimizer in ((fused_model, fused), (loop_model, loop)):
                optimizer.zero_grad()
                model(x).square().mean().backward()
                optimizer.step()
        for a, b in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_backbone_keeps_its_weights_names_and_outputs():
    """Global and local crop sizes, forward and backward: what a DINO ViT step asks of it."""
    torch.manual_seed(0)
    method_cls = get_method("dino")
    options = dataclasses.replace(method_cls.Config(), out_dim=16, hidden_dim=16)
    method = method_cls(create_backbone("vit_tiny16", 32), options, TrainContext(1, 1, 10, 32))
    keys = list(method.state_dict())
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    eager = [method.backbone(x) for x in crops]
    compile_backbones(method)
    assert list(method.state_dict()) == keys  # checkpoints and backbone.pt are unchanged
    for x, expected in zip(crops, eager, strict=True):
        out = method.backbone(x)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        out.sum().backward()
    assert all(p.grad is not None for p in method.backbone.parameters() if p.requires_grad)


def test_run_config_defaults_keep_the_reference_path():
    train = RunConfig().train
    assert (train.augment_on, train.compile) == ("cpu", False)


def test_vits_use_fused_scaled_dot_product_attention():
    backbone = create_backbone("vit_tiny16", 32)
    assert all(block.attn.fused_attn for block in backbone.model.blocks)
