"""Time ``sslbench.evaluation.knn.knn_classify`` at ImageNet-subset scale: 50,000 bank x 10,000 test features.

Run: ``python benchmarks/bench_knn.py [--device cuda] [--train 50000 --test 10000 --dim 384]``.

The features are random, L2-normalised, with 10 classes and a fixed seed: the time of a k-NN evaluation
does not depend on what the features mean. ``knn_classify`` is called as the runner calls it (the k
values and temperature of ``EvalConfig``, its own default chunk size), so the number is the cost of one
k-NN evaluation of one model. It never builds the whole test x train similarity matrix: it scores
``chunk_size`` test rows at a time (1024 by default), so the largest temporary is a
``chunk_size x n_train`` float32 block (1024 x 50,000 = 195 MiB) and its top-k.

Peak memory is the growth over the moment just before the call (features already built): on CUDA the
caching allocator's ``max_memory_allocated``, on the CPU the process's peak resident set (``VmHWM``),
whose high-water mark is reset first through ``/proc/self/clear_refs`` (or, where that is not allowed,
a thread sampling ``VmRSS`` every millisecond). ``PeakMemory`` and ``TensorPeak`` serve the other
benchmark scripts too.
"""

from __future__ import annotations

import argparse
import inspect
import json
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sslbench.config import EvalConfig
from sslbench.evaluation.knn import knn_classify

MIB = 2**20


def _status_kib(field: str) -> int:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status, in KiB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_cpu_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where the file cannot be written."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory growth (bytes) over the moment the block is entered, on ``device``.

    CUDA: ``max_memory_allocated`` after a reset, less what was allocated on entry (tensors only, not the
    allocator's cache). CPU: peak resident set of the process less the resident set on entry; this
    counts every allocation (tensors, allocator slack, library workspaces) made inside the block.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self.how = ""
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            self.how = "CUDA max_memory_allocated growth"
        elif _reset_cpu_peak():
            self.baseline_bytes = _status_kib("VmRSS") * 1024
            self.how = "peak RSS growth (VmHWM after clear_refs)"
        else:
            self.baseline_bytes = _status_kib("VmRSS") * 1024
            self._sampled = self.baseline_bytes
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
            self.how = "peak RSS growth (VmRSS sampled every 1 ms)"
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, _status_kib("VmRSS") * 1024)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled, _status_kib("VmRSS") * 1024)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.peak_bytes = max(0, peak - self.baseline_bytes)

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB


class TensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and still alive: what an exact allocator
    (CUDA's ``max_memory_allocated``) would count, without the CPU's allocator slack and library
    workspaces, so it repeats to the byte where peak RSS varies by tens of MiB from run to run.

    Every operator output whose storage is new (not one of the inputs': views and in-place results are
    not allocations) is added, and subtracted when the storage is freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if _dense(t)}
        for tensor in tree_flatten(out)[0]:
            if not _dense(tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in inputs and key not in self._seen:
                self._seen.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, nbytes)
        return out


def _dense(value: object) -> bool:
    return isinstance(value, Tensor) and value.layout == torch.strided and value.device.type != "meta"


def knn_chunk_size() -> int:
    """The chunk ``knn_classify`` uses when the caller does not pass one (the runner does not)."""
    return int(inspect.signature(knn_classify).parameters["chunk_size"].default)


def random_features(n: int, dim: int, num_classes: int, generator: torch.Generator) -> tuple:
    features = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1)
    return features, torch.randint(0, num_classes, (n,), generator=generator)


def bench_knn(
    n_train: int = 50_000,
    n_test: int = 10_000,
    dim: int = 384,
    num_classes: int = 10,
    device: str = "cpu",
    repeats: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Seconds (best of ``repeats``) and peak memory of one ``knn_classify`` call as the runner makes it."""
    generator = torch.Generator().manual_seed(seed)
    train, train_y = random_features(n_train, dim, num_classes, generator)
    test, test_y = random_features(n_test, dim, num_classes, generator)
    eval_cfg = EvalConfig()
    ks, chunk = list(eval_cfg.knn_k), knn_chunk_size()
    dev = torch.device(device)

    def call() -> dict[int, float]:
        return knn_classify(
            train, train_y, test, test_y, num_classes, ks=ks, temperature=eval_cfg.knn_temperature, device=dev
        )

    seconds, accuracy = [], {}
    with PeakMemory(dev) as memory:
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            began = time.perf_counter()
            accuracy = call()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds.append(time.perf_counter() - began)
    return {
        "train": n_train,
        "test": n_test,
        "dim": dim,
        "classes": num_classes,
        "ks": ks,
        "temperature": eval_cfg.knn_temperature,
        "chunk_size": chunk,
        "largest_block_mib": round(min(chunk, n_test) * n_train * 4 / MIB, 1),
        "full_matrix_mib": round(n_test * n_train * 4 / MIB, 1),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "seconds": round(min(seconds), 3),
        "peak_mib": round(memory.peak_mib, 1),
        "memory_measure": memory.how,
        "accuracy": {str(k): round(v, 2) for k, v in accuracy.items()},
    }


def markdown(result: dict[str, Any]) -> str:
    rows = [
        ("features (bank x test x dim)", f"{result['train']:,} x {result['test']:,} x {result['dim']}"),
        ("k values / temperature", f"{result['ks']} / {result['temperature']}"),
        ("device / threads", f"{result['device']} / {result['threads']}"),
        ("seconds", f"{result['seconds']:.2f}"),
        ("peak memory", f"{result['peak_mib']:.0f} MiB ({result['memory_measure']})"),
        (
            "chunking",
            f"{result['chunk_size']} test rows at a time: largest similarity block "
            f"{result['largest_block_mib']:.0f} MiB, never the full {result['test']:,} x {result['train']:,} "
            f"({result['full_matrix_mib']:.0f} MiB)",
        ),
    ]
    return "\n".join(["| what | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train", type=int, default=50_000, help="bank size")
    parser.add_argument("--test", type=int, default=10_000, help="queries")
    parser.add_argument("--dim", type=int, default=384, help="feature width (ViT-S/16: 384)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="calls timed; the best is reported")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    result = bench_knn(args.train, args.test, args.dim, args.classes, args.device, args.repeats)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
