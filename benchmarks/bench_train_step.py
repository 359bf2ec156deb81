"""Training-step throughput per method x small arch on the CPU (pytest-benchmark).

Run: ``pytest benchmarks/bench_train_step.py --benchmark-enable``. Every method goes through the
runner's own step (forward, loss, backward, clipping, optimizer, EMA) on one fixed batch of 32 px
views, so the numbers compare methods with each other on this machine: compare ratios, not times.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from PIL import Image

from sslbench import Step, TrainContext, create_backbone, get_method, list_methods
from sslbench.data.augment import build_view_transform
from sslbench.models.backbones import arch_spec
from sslbench.training.optim import build_optimizer, method_parameter_groups
from sslbench.training.step import optimization_step

BATCH = 16
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _batch(method) -> list[torch.Tensor]:
    transform = build_view_transform(method.view_recipe(), 32, CIFAR_MEAN, CIFAR_STD)
    generator = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(torch.randint(0, 255, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy())
        for _ in range(BATCH)
    ]
    per_image = [transform(image) for image in images]
    return [torch.stack([views[i] for views in per_image]) for i in range(len(per_image[0]))]


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny16"])
@pytest.mark.parametrize("name", [n for n in list_methods() if get_method(n).trainable])
def test_train_step(benchmark, name: str, arch: str) -> None:
    torch.manual_seed(0)
    cls = get_method(name)
    if arch_spec(arch).family not in cls.families:
        pytest.skip(f"{name} trains {'/'.join(cls.families)} only")
    config = cls.Config()
    if "local_crops_number" in {f.name for f in dataclasses.fields(config)}:
        config.local_crops_number = 2
    method = cls(create_backbone(arch, 32), config, TrainContext(1, 10, 10, 32))
    views, labels = _batch(method), torch.randint(0, 10, (BATCH,))
    optimizer = build_optimizer("adamw", method_parameter_groups(method), 0.9, torch.device("cpu"))
    step = Step(5, 1, 10, 10)

    def train_step() -> None:  # the runner's own step: clipping, hooks, optimizer and EMA included
        optimization_step(method, optimizer, views, labels, step, 3.0, 0.996, contextlib.nullcontext())

    benchmark.pedantic(train_step, rounds=3, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats["mean"]
