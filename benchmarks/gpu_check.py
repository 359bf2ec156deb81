"""The device check: bf16 correctness, training throughput and memory, achieved TFLOP/s, augmentation rate.

Run on a GPU (no network needed, a few minutes): ``bash benchmarks/gpu_check.sh [--json OUT]``.
A CPU smoke run of the same code at small sizes: ``bash benchmarks/gpu_check.sh --device cpu --tiny``.

Parts, each guarded (a failing part prints its error in the table and the others still run):

1. correctness: DINO and BYOL loss on one fixed batch (8 images) under bf16 autocast vs fp32, same
   weights, no stochastic depth; PASS when the relative difference is at most ``TOLERANCE`` = 1e-2,
   about 2.5 units of bf16's last place (2^-8): activations are rounded to bf16 layer after layer, but
   sslbench computes the losses themselves in fp32, so a loss that drifts further than that points to
   a precision bug rather than rounding (the tiny CPU run differs by ~1e-4). Exit status 1 if a check
   fails or cannot run.
2. throughput and peak memory of sslbench's real training step: the method, the runner's
   ``optimization_step`` with its clipping, AdamW and EMA, under the runner's own choice of precision
   (``precision_for``: bf16 on CUDA) and memory layout (``memory_format_for``: channels-last ResNets on
   CUDA). DINO ViT-S/16 with 2x224 + 10x96 crops, BYOL ResNet-50 with 2x224; warm-up steps excluded.
   Peak memory is the growth over the moment before the model was built (``bench_knn.PeakMemory``).
3. achieved TFLOP/s: matmul, convolution and attention FLOPs of one step counted once with
   ``FlopCounterMode`` (eager, before any compile), over the mean step time, and their share of the
   device's measured bf16 matmul peak (8192^3 on CUDA; on the CPU a 1024^3 matmul, labelled as such).
4. augmentation: ``bench_augment.augmentation_rates``, the CPU recipe in DataLoader workers vs the
   batched augmenter on the device.

``--tiny``: vit_tiny16 / resnet18 at 32 px, 2 local crops of 16 px, batch 8, 2 steps: the whole script in
about half a minute on a 2-core CPU, which is what the test suite runs.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_augment import augmentation_rates
from bench_knn import PeakMemory
from torch import Tensor

from sslbench import Step, TrainContext, create_backbone, get_method
from sslbench.base.precision import autocast_for
from sslbench.config import TrainConfig
from sslbench.data.augment import crop_sizes
from sslbench.method import Method
from sslbench.models.backbones import set_fused_attention
from sslbench.training.optim import build_optimizer, parameter_groups
from sslbench.training.runner import compile_backbones
from sslbench.training.step import fused_attention_for, memory_format_for, optimization_step, precision_for

TOLERANCE = 1e-2  # relative |loss_bf16 - loss_fp32| / |loss_fp32|: 2.5 bf16 ulps (2^-8 = 3.9e-3)
IPE = 100  # the timed step is iteration IPE, epoch 1: after DINO's frozen-last-layer epoch
FULL_NEEDS_GPU = (
    "gpu_check: the full sizes (DINO ViT-S/16 with 2x224 + 10x96 crops, BYOL ResNet-50 at 224 px) need a "
    "GPU; on the CPU add --tiny for the small smoke run"
)


@dataclass(frozen=True)
class Workload:
    name: str
    arch: str
    image_size: int
    local_crops: int  # DINO only

    def describe(self) -> str:
        global_size, local_size = crop_sizes(self.image_size)
        crops = f"2x{global_size}" + (f" + {self.local_crops}x{local_size}" if self.name == "dino" else "")
        return f"{self.name} {self.arch} {crops}"


def workloads(tiny: bool) -> list[Workload]:
    if tiny:
        return [Workload("dino", "vit_tiny16", 32, 2), Workload("byol", "resnet18", 32, 0)]
    return [Workload("dino", "vit_s16", 224, 10), Workload("byol", "resnet50", 224, 0)]


class Table:
    """Rows of the markdown table, kept for the JSON too."""

    def __init__(self) -> None:
        self.rows: list[dict[str, str]] = []
        self.data: dict[str, Any] = {}

    def add(self, part: str, item: str, result: str, status: str) -> None:
        self.rows.append({"part": part, "item": item, "result": result, "status": status})
        print(f"[{part}] {item}: {result} {status}", file=sys.stderr, flush=True)

    def guarded(self, part: str, item: str, fn: Callable[[], None]) -> bool:
        """Run one part; an exception becomes an ERROR row (traceback on stderr). False on error."""
        try:
            fn()
            return True
        except Exception as error:  # a part's failure must not stop the others
            traceback.print_exc()
            message = " ".join(f"{type(error).__name__}: {error}".split()).replace("|", "/")
            self.add(part, item, message[:300], "ERROR")  # one table cell: no newlines, no pipes
            return False

    def markdown(self) -> str:
        lines = ["| part | item | result | status |", "|---|---|---|---|"]
        lines += [f"| {r['part']} | {r['item']} | {r['result']} | {r['status']} |" for r in self.rows]
        return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(work: Workload, device: torch.device, drop_path_rate: float) -> Method:
    torch.manual_seed(0)
    cls = get_method(work.name)
    config = cls.Config()
    if work.name == "dino":
        config.local_crops_number = work.local_crops
    backbone = create_backbone(work.arch, work.image_size, drop_path_rate)
    method = cls(backbone, config, TrainContext(10, IPE, 10, work.image_size))
    return method.to(device, memory_format=memory_format_for(device, backbone.family))


def make_views(work: Workload, batch: int, device: torch.device, family: str) -> list[Tensor]:
    """A fixed batch of normalised-pixel views at sslbench's crop sizes (content does not change cost)."""
    generator = torch.Generator().manual_seed(1)
    global_size, local_size = crop_sizes(work.image_size)
    sizes = [global_size] * 2 + [local_size] * (work.local_crops if work.name == "dino" else 0)
    layout = memory_format_for(device, family)
    return [torch.randn(batch, 3, s, s, generator=generator).to(device, memory_format=layout) for s in sizes]


def correctness(work: Workload, batch: int, device: torch.device, table: Table) -> bool:
    """Loss under bf16 autocast vs fp32 from the same weights and batch; True when within tolerance."""
    method = build(work, device, drop_path_rate=0.0)  # no stochastic depth: both passes see one network
    views = make_views(work, batch, device, method.backbone.family)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    step = Step(IPE, 1, IPE, 10 * IPE)
    losses = {}
    for precision in ("fp32", "bf16"):
        copy_ = copy.deepcopy(method)  # a step moves DINO's centre and BN statistics: start both alike
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            losses[precision] = float(copy_.training_step(views, labels, step).loss)
    rel = abs(losses["bf16"] - losses["fp32"]) / max(abs(losses["fp32"]), 1e-12)
    passed = rel <= TOLERANCE
    result = (
        f"fp32 {losses['fp32']:.5f}, bf16 {losses['bf16']:.5f}, rel. diff {rel:.1e} (tol {TOLERANCE:.0e})"
    )
    item = f"{work.name} {work.arch} loss bf16 vs fp32, batch {batch}"
    table.add("correctness", item, result, "PASS" if passed else "FAIL")
    table.data.setdefault("correctness", {})[work.name] = {**losses, "rel_diff": rel, "passed": passed}
    return passed


def matmul_peak(device: torch.device, n: int, table: Table) -> float:
    """Measured bf16 matmul TFLOP/s: the ceiling the training steps are compared with."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    iters, began = 0, time.perf_counter()
    while iters < 5 or time.perf_counter() - began < 0.5:
        a @ b
        iters += 1
        if iters % 10 == 0:
            _sync(device)
    _sync(device)
    tflops = 2 * n**3 * iters / (time.perf_counter() - began) / 1e12
    where = "CPU" if device.type == "cpu" else device_name(device)
    table.add("peak", f"bf16 matmul {n}^3 on {where}", f"{tflops:.2f} TFLOP/s", "OK")
    table.data["matmul_peak"] = {"n": n, "tflops": tflops, "device": where}
    return tflops


def count_flops(run: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def throughput(work: Workload, args: argparse.Namespace, peak: float | None, table: Table) -> None:
    """sslbench's real training step: rate, peak memory, and FLOP/s against the matmul peak."""
    device, train = args.device, TrainConfig()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory(device) as memory:
        method = build(work, device, train.drop_path_rate)
        views = make_views(work, args.batch, device, method.backbone.family)
        labels = torch.zeros(args.batch, dtype=torch.long, device=device)
        optimizer = build_optimizer(train.optimizer, parameter_groups([method]), train.momentum, device)
        for group in optimizer.param_groups:
            group["lr"] = train.lr * args.batch / 256
            if group["regularized"]:
                group["weight_decay"] = train.weight_decay
        precision = precision_for(train, device)
        autocast = autocast_for(precision, device)
        set_fused_attention(method, fused_attention_for(device, precision))  # as the runner does
        step = Step(IPE, 1, IPE, 10 * IPE)

        def run() -> object:
            return optimization_step(
                method, optimizer, views, labels, step, train.clip_grad, train.ema_momentum, autocast
            )

        flops = count_flops(run)  # eager, before any compile hides the operators; also a warm-up step
        compiled = maybe_compile(method, args.compile)
        for _ in range(args.warmup):
            run()
        _sync(device)
        began = time.perf_counter()
        for _ in range(args.steps):
            run()
        _sync(device)
        seconds = (time.perf_counter() - began) / args.steps
    rate = args.batch / seconds
    label = f"{work.describe()}, batch {args.batch}, {precision}{', compiled' if compiled else ''}"
    table.add("throughput", label, f"{rate:.1f} images/s ({1000 * seconds:.0f} ms/step)", "OK")
    table.add("memory", label, f"{memory.peak_mib:.0f} MiB peak ({memory.how})", "OK")
    tflops = flops / seconds / 1e12
    share = f", {100 * tflops / peak:.1f}% of the bf16 matmul peak" if peak else ""
    table.add("flops", label, f"{tflops:.3f} TFLOP/s ({flops / 1e12:.3f} TFLOP per step){share}", "OK")
    table.data.setdefault("throughput", {})[work.name] = {
        "arch": work.arch,
        "views": work.describe(),
        "batch": args.batch,
        "precision": precision,
        "compiled": compiled,
        "step_s": seconds,
        "images_per_s": rate,
        "peak_mib": memory.peak_mib,
        "memory_measure": memory.how,
        "flops_per_step": flops,
        "tflops": tflops,
        "peak_share": tflops / peak if peak else None,
    }


def maybe_compile(method: Method, wanted: bool) -> bool:
    """``torch.compile`` through the runner's own helper, as ``sslbench run --compile`` does."""
    if wanted:
        compile_backbones(method)
    return wanted


def augmentation(args: argparse.Namespace, table: Table) -> None:
    """The CPU view recipe in loader workers vs the batched augmenter on the device."""
    work = workloads(args.tiny)[0]
    settings = {
        "device": args.device,
        "image_size": work.image_size,
        "batch": args.batch,
        "workers": 0 if args.tiny else min(16, os.cpu_count() or 1),
        "seconds": 0.5 if args.tiny else 5.0,
        "num_local_crops": work.local_crops,
    }
    rates = augmentation_rates(**settings)
    views = rates["views"]
    cpu, batched = rates["cpu"], rates["batched"]
    table.add("augmentation", f"CPU recipe, {rates['workers']} workers, {views}", f"{cpu:.0f} images/s", "OK")
    speedup = f"{batched:.0f} images/s ({batched / cpu:.1f}x the CPU recipe)"
    table.add("augmentation", f"batched on {rates['device']}, {views}", speedup, "OK")
    table.data["augmentation"] = rates


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "CPU"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default cuda if available")
    parser.add_argument("--tiny", action="store_true", help="small arches at 32 px: a quick CPU run")
    parser.add_argument("--steps", type=int, help="timed steps (default 10, tiny 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3, tiny 1)")
    parser.add_argument("--batch", type=int, help="images per step (default 64, tiny 8)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    parser.add_argument("--compile", action="store_true", help="torch.compile via the runner, if it can")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.steps = max(1, args.steps or (2 if args.tiny else 10))
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.batch = args.batch or (8 if args.tiny else 64)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.type == "cpu" and not args.tiny:
        print(FULL_NEEDS_GPU, file=sys.stderr)
        return 2
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    table = Table()
    mode = "tiny" if args.tiny else "full"
    began = time.perf_counter()
    passed = True
    for work in workloads(args.tiny):
        item = f"{work.name} {work.arch} loss bf16 vs fp32"
        ok = table.guarded("correctness", item, lambda w=work: correctness(w, 8, args.device, table))
        passed &= ok and table.data.get("correctness", {}).get(work.name, {}).get("passed", False)
    peak: list[float] = []
    n = 1024 if args.device.type == "cpu" else 8192
    table.guarded("peak", f"bf16 matmul {n}^3", lambda: peak.append(matmul_peak(args.device, n, table)))
    for work in workloads(args.tiny):
        measure = functools.partial(throughput, work, args, peak[0] if peak else None, table)
        table.guarded("throughput", work.describe(), measure)
    table.guarded("augmentation", "CPU recipe vs batched", lambda: augmentation(args, table))
    seconds = time.perf_counter() - began
    print(f"gpu_check ({mode}) on {device_name(args.device)}, torch {torch.__version__}, {seconds:.0f} s\n")
    print(table.markdown())
    print(f"\ncorrectness: {'PASS' if passed else 'FAIL'}")
    if args.json:
        record = {"mode": mode, "device": str(args.device), "device_name": device_name(args.device)}
        record |= {"torch": torch.__version__, "seconds": seconds, "passed": passed, "rows": table.rows}
        args.json.write_text(json.dumps(record | table.data, indent=2, default=str) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
