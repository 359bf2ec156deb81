"""Every registered method's training step beside DINO's on the same arch, at the quick preset's sizes.

Run: ``python benchmarks/bench_methods.py [--archs resnet18,vit_tiny16] [--rounds 3] [--methods a,b]``
(DINO always runs, the peer of every ratio). Each pair is
planned and built as ``sslbench run`` does (quick preset: 32 px, batch 32, DINO's 1024-d head and 2
local crops, every other method at its small-data defaults, the machine's precision) and steps through
the runner's own step on one fixed batch of embedded images; rounds interleave the methods, so a
noisy machine slows them alike. Prints seconds per step (median) and the ratio to DINO on that arch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sslbench.base.precision import autocast_for
from sslbench.config import load_preset, resolve_config
from sslbench.data.augment import build_view_transform
from sslbench.data.datasets import load_dataset
from sslbench.method.base import Step
from sslbench.method.registry import get_method, list_methods
from sslbench.models.backbones import arch_spec, create_backbone
from sslbench.training.optim import build_optimizer, method_parameter_groups
from sslbench.training.runner import build_method, plan_pair
from sslbench.training.step import optimization_step, precision_for

BATCH = 32


def _pair_step(name: str, arch: str, data, device: torch.device):
    """A closure that runs one optimisation step of the pair, as the runner would."""
    config = resolve_config([load_preset("quick")], list(list_methods()))
    plan = plan_pair(get_method(name), arch, config, device, data.image_size)
    torch.manual_seed(0)
    method = build_method(plan, create_backbone(arch, data.image_size, plan.train.drop_path_rate), data, 20)
    method.train()
    transform = build_view_transform(method.view_recipe(), data.image_size, data.mean, data.std)
    per_image = [transform(data.train.load(i)) for i in range(BATCH)]
    views = [torch.stack(group) for group in zip(*per_image, strict=True)]
    labels = torch.as_tensor(data.train.labels[:BATCH])
    optimizer = build_optimizer(plan.train.optimizer, method_parameter_groups(method), 0.9, device)
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    autocast = autocast_for(precision_for(plan.train, device), device)
    steps = iter(range(10**9))

    def step() -> None:
        iteration = 20 + next(steps)  # past every freezing rule
        out = Step(iteration, 1, 20, 40)
        optimization_step(method, optimizer, views, labels, out, 3.0, 0.996, autocast)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet18,vit_tiny16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default="", help="comma-separated (default: every trainable one)")
    args = parser.parse_args()
    device = torch.device("cpu")
    data = load_dataset("embedded")
    chosen = {"dino", *filter(None, args.methods.split(","))} if args.methods else set(list_methods())
    names = [n for n in list_methods() if get_method(n).trainable and n in chosen]
    for arch in args.archs.split(","):
        family = arch_spec(arch).family
        pairs = {n: _pair_step(n, arch, data, device) for n in names if family in get_method(n).families}
        times: dict[str, list[float]] = {n: [] for n in pairs}
        for step in pairs.values():
            step()  # warm-up
        for _ in range(args.rounds):
            for name, step in pairs.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        dino = statistics.median(times["dino"])
        print(f"\n{arch}, batch {BATCH}, median of {args.rounds}:")
        print("| method | s / step | vs dino |\n|---|---:|---:|")
        for name in sorted(times, key=lambda n: statistics.median(times[n])):
            median = statistics.median(times[name])
            print(f"| {name} | {median:.2f} | {median / dino:.2f} |")


if __name__ == "__main__":
    main()
