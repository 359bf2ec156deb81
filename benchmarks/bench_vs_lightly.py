"""sslbench vs lightly: the same DINO / BYOL / SimCLR training step written two ways, timed side by side.

Run: ``python benchmarks/bench_vs_lightly.py [--device cpu] [--archs resnet18,vit_tiny16] [--rounds 5]
[--compare same|defaults|both]``.

Both sides train one seeded ``sslbench.create_backbone(arch, image_size)`` (copied: same weights) on the
same fixed batch of views (random normalised pixels; a step's cost does not depend on them), with AdamW
(sslbench's lr x B/256 and weight decay), the same head sizes and the runner's memory layout
(``memory_format_for``). Precision is set per side; ``--compare`` picks the comparisons (default both),
each its own table:

- same precision: both sides at sslbench's ``precision: auto`` (``sslbench.base.precision``: bf16
  autocast on CUDA and on CPUs with AMX or AVX512-BF16, fp32 elsewhere). Only the code differs: parity
  is expected.
- each library's default: sslbench at auto against lightly at fp32, which is what lightly trains in out
  of the box: its examples use PyTorch Lightning's default 32-bit precision, with no autocast, on a CPU
  and on CUDA alike (there unless a user enables AMP, e.g. ``precision="bf16-mixed"``).

Where auto resolves to fp32 the two comparisons coincide and only the first is run.

The two sides:

- sslbench: the registry's method stepped by the runner's ``optimization_step`` (forward, loss, backward,
  the method's hook, AdamW, EMA), clipping off as lightly's examples do not clip; with the runner's
  fused AdamW and its attention kernel for the precision (``fused_attention_for``: matmul-softmax-matmul
  on a CPU under bf16, PyTorch's fused kernel elsewhere).
- lightly: the step as its examples write it: ``DINOProjectionHead`` + ``DINOLoss`` +
  ``cancel_last_layer_gradients``; ``BYOLProjectionHead`` + ``BYOLPredictionHead`` +
  ``NegativeCosineSimilarity``; ``SimCLRProjectionHead`` + ``NTXentLoss``; teachers frozen with
  ``deactivate_requires_grad`` and moved with ``update_momentum`` before the forward;
  ``torch.optim.AdamW`` at its defaults (a per-parameter loop on the CPU, multi-tensor on CUDA) and
  timm's default attention kernel (PyTorch's fused one).

Hyper-parameters come from the sslbench configs: DINO out_dim (4096 at <= 64 px, else 65536), hidden
2048, bottleneck 256, teacher / student temperature 0.04 / 0.1, centre momentum 0.9, last layer frozen
for epoch 0 (both sides are timed in epoch 1), ``--local-crops`` (default 2 on the CPU for speed,
sslbench's 10 on CUDA); BYOL hidden 4096, projection 256; SimCLR hidden = feature width, output 128,
temperature 0.5 at <= 64 px. lightly's heads take sslbench's initial weights, so the first losses should
agree; the table gives their relative difference. What still differs is lightly's code, not the set-up:

- BYOL: ``NegativeCosineSimilarity`` is ``-cos``; the lightly side writes ``4 + 2 (L(p0, z1) + L(p1, z0))``,
  sslbench's (the paper's) symmetrised ``2 - 2 cos``: same value, same gradients.
- SimCLR: ``NTXentLoss`` averages over the 2N anchors; sslbench sums the two views' means as the
  reference code does, so the lightly side returns twice its loss: same value, same gradients.
- Views: lightly's examples send each view through on its own; sslbench batches the crops of one
  resolution (DINO, SimCLR) as the references do: the same FLOPs in fewer, larger calls, but BatchNorm
  statistics over the batched views, so DINO with a ResNet and SimCLR (BN in its head) start from
  slightly different losses. BYOL goes per view on both sides.
- sslbench's ``MLPHead`` gives the Linear before a BatchNorm a bias (BN cancels it); lightly's does not.
- sslbench's DINO computes its collapse diagnostics only on logged iterations; these steps are not.
- sslbench computes losses in fp32 under autocast; lightly's losses take bf16 inputs where its side
  autocasts. In the defaults comparison the first losses also differ by bf16 rounding on sslbench's side.

Timing: both implementations live in one process and alternate step by step (order swapped each round),
so both see the same load on a shared machine; warm-up is not timed; CUDA is synchronised around steps.
The ratio is given from mean step times and, more robust to a neighbour's bursts, from medians.

Memory: each implementation is rebuilt alone in a fresh subprocess (no tensors or freed heap of the
other) at its side's precision and steps ``--memory-steps`` times (2: the second is the steady state);
sslbench's side, the same in both comparisons, is measured once per method and arch. Both figures are
growth over the post-setup baseline (models, optimizer, views built, nothing stepped). peak MiB: on the
CPU the peak resident set (``VmHWM`` reset via ``/proc/self/clear_refs``) less the resident set then, on CUDA
``max_memory_allocated`` (``bench_knn.PeakMemory``); resident memory includes allocator slack and oneDNN
workspaces. tensor peak MiB: the most bytes of live tensor storages (``bench_knn.TensorPeak``), the
CPU analogue of CUDA's allocator peak; it repeats exactly. The subprocesses pin glibc's mmap threshold
at its 128 KiB default (``MALLOC_MMAP_THRESHOLD_``; ``--default-malloc`` leaves it dynamic): by default
glibc raises the threshold to the size of the largest block freed, after which activations come from
the heap and its fragmentation adds tens to ~150 MiB of resident memory that changes from run to run
and grows with the size of each tensor (batched views), which hides the implementations' own needs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_knn import PeakMemory, TensorPeak
from step_pair import (
    IMPLS,
    METHODS,
    Setup,
    Side,
    lightly_side,
    make_views,
    method_config,
    seeded_backbone,
    sslbench_side,
)

from sslbench.base.precision import precision_choice
from sslbench.config import TrainConfig
from sslbench.data.augment import crop_sizes

MMAP_THRESHOLD = 128 * 1024  # glibc's default, pinned: see the module docstring
COMPARISONS = ("same", "defaults")
# Lightning's default 32-bit precision, no autocast, on the CPU and on CUDA (there until AMP is enabled)
LIGHTLY_DEFAULT = "fp32"

Precisions = dict[str, str]  # implementation -> resolved precision ("fp32" or "bf16")


def comparison_plan(requested: str, auto: str) -> list[tuple[str, Precisions]]:
    """The comparisons to run with each side's precision; a repeat of an earlier one is dropped."""
    plan: list[tuple[str, Precisions]] = []
    for name in COMPARISONS if requested == "both" else (requested,):
        precisions = {"sslbench": auto, "lightly": auto if name == "same" else LIGHTLY_DEFAULT}
        if all(precisions != earlier for _, earlier in plan):
            plan.append((name, precisions))
    return plan


def heading(name: str, precisions: Precisions) -> str:
    ssl, lit = precisions["sslbench"], precisions["lightly"]
    if name == "same":
        return f"Same precision ({ssl} both)"
    return f"Each library's default (sslbench auto = {ssl}, lightly {lit})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(sides: dict[str, Side], rounds: int, device: torch.device) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {impl: [] for impl in sides}
    for r in range(rounds):
        for impl in list(sides) if r % 2 == 0 else list(reversed(sides)):
            _sync(device)
            began = time.perf_counter()
            sides[impl].step()
            _sync(device)
            times[impl].append(time.perf_counter() - began)
    return times


def profile_step(side: Side, label: str, rows: int) -> None:
    """Where one (warm) step's time goes, by operator self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        side.step()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"\n#### {label}\n\n```\n{prof.key_averages().table(sort_by=key, row_limit=rows)}\n```")


def memory_in_subprocess(impl: str, precision: str, setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", impl]
    command += ["--child-precision", precision]
    command += ["--methods", setup.name, "--archs", setup.arch, "--device", str(setup.device)]
    command += ["--image-size", str(setup.image_size), "--batch", str(setup.batch)]
    command += ["--local-crops", str(setup.local_crops), "--memory-steps", str(args.memory_steps)]
    command += ["--threads", str(torch.get_num_threads())]
    env = dict(os.environ)
    if not args.default_malloc:  # the caller's own setting wins
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_child(impl: str, precision: str, setup: Setup, steps: int) -> dict[str, Any]:
    """Build one implementation alone, then measure its steps' peak over the post-setup baseline."""
    views, backbone = make_views(setup), seeded_backbone(setup)
    if impl == "sslbench":
        side, _ = sslbench_side(setup, backbone, views, precision)
    else:
        side, _ = lightly_side(setup, backbone, views, method_config(setup), None, precision)
    gc.collect()
    with PeakMemory(setup.device) as memory, TensorPeak() as tensors:
        for _ in range(steps):
            side.step()
    return {
        "peak_mib": round(memory.peak_mib, 1),
        "how": memory.how,
        "tensor_peak_mib": round(tensors.peak / 2**20, 1),
        "params": side.params,
    }


def compare(
    setup: Setup,
    name: str,
    precisions: Precisions,
    args: argparse.Namespace,
    measured: dict[tuple, dict[str, Any]],
) -> dict[str, Any]:
    """One comparison of one (method, arch); ``measured`` caches memory runs shared by comparisons."""
    views, backbone = make_views(setup), seeded_backbone(setup)
    lightly_backbone = copy.deepcopy(backbone)
    ssl, method = sslbench_side(setup, backbone, views, precisions["sslbench"])
    lit, same_init = lightly_side(
        setup, lightly_backbone, views, method.config, method, precisions["lightly"]
    )
    sides = {"sslbench": ssl, "lightly": lit}
    first = {impl: float(side.step()) for impl, side in sides.items()}  # from identical weights
    for _ in range(args.warmup - 1):
        for side in sides.values():
            side.step()
    times = time_interleaved(sides, args.rounds, setup.device)
    if args.profile:
        for impl, side in sides.items():
            profile_step(side, f"{impl} ({precisions[impl]}): {setup.name} {setup.arch}", args.profile)
    del sides, ssl, lit, method
    gc.collect()
    for impl in IMPLS:
        key = (impl, precisions[impl], setup.name, setup.arch)
        if key not in measured:
            measured[key] = memory_in_subprocess(impl, precisions[impl], setup, args)
    memory = {impl: measured[impl, precisions[impl], setup.name, setup.arch] for impl in IMPLS}
    result: dict[str, Any] = {"comparison": name, "method": setup.name, "arch": setup.arch}
    result |= {f"{impl}_precision": precisions[impl] for impl in IMPLS} | {"same_init": same_init}
    for impl in IMPLS:
        mean = sum(times[impl]) / len(times[impl])
        result[impl] = {
            "step_s": times[impl],
            "mean_step_s": mean,
            "median_step_s": statistics.median(times[impl]),
            "images_per_s": setup.batch / mean,
            "first_loss": first[impl],
            **memory[impl],
        }
    result["ratio"] = result["sslbench"]["images_per_s"] / result["lightly"]["images_per_s"]
    result["ratio_median"] = result["lightly"]["median_step_s"] / result["sslbench"]["median_step_s"]
    result["loss_rel_diff"] = abs(first["sslbench"] - first["lightly"]) / max(abs(first["lightly"]), 1e-12)
    return result


def _mib(entry: dict[str, Any], key: str = "peak_mib") -> str:
    return f"{entry[key]:.0f}" if key in entry else f"error: {entry.get('error')}"


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| method | arch | sslbench img/s | lightly img/s | ratio (of medians) | peak MiB sslbench / lightly "
        "| tensor peak MiB sslbench / lightly | params sslbench / lightly | first-loss rel. diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s, li = r["sslbench"], r["lightly"]
        diff = f"{r['loss_rel_diff']:.1e}" if r["same_init"] else "n/a (different init)"
        params = f"{s.get('params', 0) / 1e6:.2f}M / {li.get('params', 0) / 1e6:.2f}M"
        tensors = f"{_mib(s, 'tensor_peak_mib')} / {_mib(li, 'tensor_peak_mib')}"
        lines.append(
            f"| {r['method']} | {r['arch']} | {s['images_per_s']:.1f} | {li['images_per_s']:.1f} "
            f"| {r['ratio']:.2f} ({r['ratio_median']:.2f}) | {_mib(s)} / {_mib(li)} | {tensors} | {params} "
            f"| {diff} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", help="default resnet18,vit_tiny16 (CPU), resnet50,vit_s16 (CUDA)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, help="images per step; default 32 on the CPU, 128 on CUDA")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    parser.add_argument("--local-crops", type=int, help="DINO local crops; default 2 on the CPU, 10 on CUDA")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps of each memory subprocess")
    parser.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's dynamic mmap threshold in memory runs"
    )
    parser.add_argument(
        "--compare",
        choices=(*COMPARISONS, "both"),
        default="both",
        help="same: both sides at sslbench's auto precision; defaults: lightly at its fp32 (default both)",
    )
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print top operators")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 resists a busy CPU")
    parser.add_argument("--json", type=Path, metavar="OUT")
    parser.add_argument("--memory-child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--child-precision", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.archs = args.archs or ("resnet50,vit_s16" if cuda else "resnet18,vit_tiny16")
    args.batch = args.batch or (128 if cuda else 32)
    args.local_crops = args.local_crops if args.local_crops is not None else (10 if cuda else 2)
    args.warmup = max(1, args.warmup)
    return args


def report(
    plan: list[tuple[str, Precisions]], results: list[dict[str, Any]], args: argparse.Namespace
) -> None:
    """One table per comparison, then what the columns mean."""
    for name, precisions in plan:
        print(f"### {heading(name, precisions)}\n")
        print(markdown([r for r in results if r["comparison"] == name]) + "\n")
    how = next((r["sslbench"]["how"] for r in results if "how" in r["sslbench"]), "")
    if torch.device(args.device).type == "cpu" and not args.default_malloc:
        how += ", glibc mmap threshold pinned"
    print(
        "ratio: sslbench / lightly images/s from mean step times, in brackets from median ones (> 1: "
        "sslbench faster). Peak memory over the post-setup "
        f"baseline, {args.memory_steps} steps in a subprocess per implementation and precision: {how}; "
        "tensor peak: live tensor storages only (exact, repeatable)."
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    setups = [
        Setup(name, arch, device, args.image_size, args.batch, args.local_crops)
        for name in args.methods.split(",")
        for arch in args.archs.split(",")
    ]
    if args.memory_child:
        child = memory_child(args.memory_child, args.child_precision, setups[0], args.memory_steps)
        print(json.dumps(child))
        return 0
    global_size, local_size = crop_sizes(args.image_size)
    auto, why = precision_choice(TrainConfig().precision, device)
    plan = comparison_plan(args.compare, auto)
    print(
        f"device {device}, {torch.get_num_threads()} threads, sslbench precision {auto} ({why}), lightly "
        f"default {LIGHTLY_DEFAULT}, batch {args.batch}, {global_size} px (DINO: 2x{global_size} + "
        f"{args.local_crops}x{local_size}), {args.rounds} timed rounds after {args.warmup} warm-up\n"
    )
    if args.compare == "both" and len(plan) == 1:
        print(f"lightly's default is sslbench's precision here ({auto}): one comparison covers both\n")
    results: list[dict[str, Any]] = []
    measured: dict[tuple, dict[str, Any]] = {}  # memory runs, shared between comparisons
    for setup in setups:
        for name, precisions in plan:
            results.append(compare(setup, name, precisions, args, measured))
            ratio = results[-1]["ratio"]
            print(f"{setup.name} {setup.arch} {name}: ratio {ratio:.2f}", file=sys.stderr, flush=True)
    report(plan, results, args)
    if args.json:
        meta = {"device": str(device), "threads": torch.get_num_threads(), "batch": args.batch}
        meta |= {"image_size": args.image_size, "local_crops": args.local_crops, "rounds": args.rounds}
        meta |= {"sslbench_auto_precision": auto, "comparisons": dict(plan)}
        args.json.write_text(json.dumps({"settings": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
