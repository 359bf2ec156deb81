"""Run a function on 2 gloo ranks (CPU processes) and compare it with one process on the whole batch.

A loss that computes over the whole batch (gathered negatives, a queue of every rank's keys, a Sinkhorn
over the global batch, an all-reduced cross-correlation) must give each rank, once DDP averages the
ranks' gradients, the gradient of one process on the whole batch. ``loss_and_grads_on_ranks`` checks
that for a loss function of tensors, without a model or the runner.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

LossFn = Callable[..., Tensor]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: LossFn, inputs: Sequence[Tensor], out_dir: str) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        local = [x.chunk(world)[rank].clone().requires_grad_(x.is_floating_point()) for x in inputs]
        loss = fn(*local)
        loss.backward()
        # DDP averages the ranks' gradients; each rank's gradient here reaches only its own slice, so the
        # average over ranks of the full-batch gradient is this slice's gradient / world, gathered.
        grads = [x.grad / world if x.grad is not None else None for x in local]
        torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def loss_and_grads_on_ranks(
    fn: LossFn, inputs: Sequence[Tensor], world: int = 2
) -> tuple[list[Tensor], list[Tensor | None]]:
    """Each rank's loss, and the gradient of every input (its rows from each rank, in rank order) as DDP's
    averaging would leave it. ``fn`` must be a module-level function (it is pickled to the ranks)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _rank_main,
            args=(world, _free_port(), fn, [x.detach() for x in inputs], out_dir),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    losses = [r["loss"] for r in results]
    grads = []
    for i in range(len(inputs)):
        parts = [r["grads"][i] for r in results]
        grads.append(None if parts[0] is None else torch.cat(parts))
    return losses, grads


def loss_and_grads_in_one_process(fn: LossFn, inputs: Sequence[Tensor]) -> tuple[Tensor, list[Tensor | None]]:
    local = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    loss = fn(*local)
    loss.backward()
    return loss.detach(), [x.grad for x in local]
