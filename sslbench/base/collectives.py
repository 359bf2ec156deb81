"""Collectives over the ranks of a distributed run, for every part that computes over the whole batch.

Losses need them (DINO's center averaged over every rank, SimCLR's negatives gathered from every rank),
and so do the loop's checks and the rank-0-only writes. Outside torchrun (no process group) each one is
the identity, so the single-process path has no branches of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Only the main rank evaluates and writes results; the others train and wait."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean over ranks of a tensor every rank holds (no gradient)."""
    if not is_distributed():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def _collective_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo, CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(value: T) -> list[T]:
    """Every rank's ``value``, in rank order (a list of one outside torchrun)."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any: a decision all ranks act on together."""
    if not is_distributed():
        return flag
    value = torch.tensor([float(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


_host_group: Any = None  # a gloo group for decisions made on the host; None: the default group is gloo


def use_host_group(group: Any) -> None:
    """Set at start-up under NCCL, whose collectives need device tensors (and so wait for the device)."""
    global _host_group
    _host_group = group


def max_on_host(value: int) -> int:
    """The largest ``value`` over ranks, reduced on the host (gloo): it never waits for the device, so
    asking it every step costs no synchronisation of the GPU's queue."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_host_group)
    return int(tensor.item())


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` concatenated along dim 0, in rank order; the gradient of each slice
    returns to the rank that produced it (summed over the ranks that used it)."""
    if not is_distributed():
        return tensor
    return torch.cat(dist_fn.all_gather(tensor))


def gather_without_grad(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` concatenated along dim 0, in rank order, detached: what enters a queue of
    past keys (MoCo's ``concat_all_gather``) or is only read (SwAV's and DINOv2's Sinkhorn inputs)."""
    if not is_distributed():
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum over ranks of a tensor every rank holds, without gradient (a Sinkhorn normaliser, counts)."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def all_reduce_sum_with_grad(tensor: Tensor) -> Tensor:
    """The sum over ranks, differentiable: the backward pass sums the upstream gradients over ranks, so
    a loss every rank computes alike from the global sum (Barlow Twins' cross-correlation) gives, once
    DDP averages the ranks' gradients, the gradient of one process on the whole batch."""
    if not is_distributed():
        return tensor
    return dist_fn.all_reduce(tensor)


def rank_rows(global_rows: Tensor, dim: int = 0) -> Tensor:
    """This rank's rows of a tensor drawn once for the whole global batch (masks): the sampler deals each
    global batch to the ranks in turn (rank r has images r, r + W, ...), so taking the same rows makes
    2 ranks draw exactly what 1 process draws for the same images."""
    if not is_distributed():
        return global_rows
    index = torch.arange(rank(), global_rows.shape[dim], world_size(), device=global_rows.device)
    return global_rows.index_select(dim, index)


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main rank and give its result, or its error, to every rank.

    Checks before training (a refused results folder, a chosen folder name) must agree on all ranks, or
    the others would wait forever for a rank that stopped.
    """
    if not is_distributed():
        return fn()
    payload: list[Any] = [None]
    if is_main():
        try:
            payload[0] = ("ok", fn())
        except Exception as error:
            payload[0] = ("error", error)
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise value
    return value
