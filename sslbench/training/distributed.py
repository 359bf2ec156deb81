"""Data-parallel training across processes: ``torchrun --nproc_per_node=N -m sslbench run ...``.

The batch size in the config is the global batch; each of the N ranks trains on ``batch_size / N``
images and DistributedDataParallel averages the gradients, so N ranks take the same steps as one
process with the whole batch (tested to float tolerance on 2 CPU ranks). What the papers compute over
the whole batch is computed over all ranks here too:

- DINO's center (Eq. 4) averages the teacher outputs of every rank (``all_reduce_mean``);
- SimCLR's negatives come from every rank (``gather_with_grad``: gradients flow back to the rank
  that produced each embedding), as in the paper's global-batch TPU implementation;
- BatchNorm statistics are global (SyncBatchNorm), as the DINO, BYOL and SimCLR references do for
  ResNets. PyTorch's SyncBatchNorm needs a GPU; on the CPU (gloo) ``CrossRankBatchNorm`` does the same.

The collectives themselves (all-reduce, gather, rank-0-only work) are in ``sslbench.base.collectives``,
where the losses can reach them. Outside torchrun (no ``WORLD_SIZE``) every function here is the identity,
so the single-process path has no branches of its own.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from sslbench.base.collectives import is_distributed, use_host_group
from sslbench.base.errors import SSLBenchError
from sslbench.models.batch_norm_groups import GroupedBatchNorm

# DDP's flag for "no buffer broadcast every step": torch 2.14 renames broadcast_buffers, with a warning.
_BUFFER_SYNC_FLAG = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else "broadcast_buffers"
)
# The helper ranks wait in a collective while the main rank evaluates a pair or monitors: allow for it.
PROCESS_GROUP_TIMEOUT = timedelta(hours=3)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group torchrun (or ``sslbench submit``'s job) set up (NCCL on GPUs, gloo on the
    CPU); return this rank's device."""
    if not launched_by_torchrun() or dist.is_initialized():
        return device
    if device.type == "cuda":
        local_rank = _local_gpu(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=PROCESS_GROUP_TIMEOUT)
        use_host_group(dist.new_group(backend="gloo", timeout=PROCESS_GROUP_TIMEOUT))  # stop requests
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return device


def _local_gpu(local_rank: int, visible: int) -> int:
    """This process's GPU: LOCAL_RANK's among the node's, or the one GPU a scheduler bound it to."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise SSLBenchError(
            f"process {local_rank} of this node sees {visible} GPU(s): start one process per GPU "
            "(torchrun --nproc_per_node, or sslbench submit --tasks-per-node)"
        )
    return local_rank


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class CrossRankBatchNorm(_BatchNorm):
    """BatchNorm with statistics over every rank's batch, for the CPU where SyncBatchNorm is unavailable.

    Sums and squared sums are all-reduced with a differentiable all-reduce, so the gradient through
    the statistics includes every rank's loss, as SyncBatchNorm's does.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        local_count = input.numel() // input.shape[1]
        x = input.float()  # statistics in fp32 under bf16 autocast, as SyncBatchNorm and BatchNorm keep them
        sums = torch.cat([x.sum(dims), (x * x).sum(dims)])
        sums = dist_fn.all_reduce(sums)
        count = local_count * dist.get_world_size()
        mean, mean_sq = sums.chunk(2)
        mean, mean_sq = mean / count, mean_sq / count
        var = (mean_sq - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / max(count - 1, 1), momentum)
                self.num_batches_tracked.add_(1)
        shape = [1, -1] + [1] * (input.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def _convert_batch_norms(module: nn.Module, make: Callable[[_BatchNorm], nn.Module]) -> nn.Module:
    """``module`` with every BatchNorm made global by ``make``, its state kept; a ``GroupedBatchNorm``
    (MoCo v2's shuffling BN) already reduces its groups over the ranks and is left as it is."""
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(
        module, (CrossRankBatchNorm, nn.SyncBatchNorm, GroupedBatchNorm)
    ):
        converted = make(module)
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        converted.to(next(module.buffers(), torch.empty(0)).device)
        if module.affine:
            converted.weight.requires_grad_(module.weight.requires_grad)
            converted.bias.requires_grad_(module.bias.requires_grad)
    for name, child in module.named_children():
        converted.add_module(name, _convert_batch_norms(child, make))
    return converted


def sync_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    """Global BatchNorm statistics across ranks: SyncBatchNorm on GPUs, CrossRankBatchNorm elsewhere."""
    if not is_distributed():
        return module
    kind = nn.SyncBatchNorm if device.type == "cuda" else CrossRankBatchNorm
    return _convert_batch_norms(
        module, lambda bn: kind(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    )


def data_parallel(method: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the method (its ``forward`` is the training step), or the method.

    Buffers are not broadcast each step: BatchNorm statistics are synchronised and DINO's center is
    all-reduced, so every rank already holds the same values.
    """
    if not is_distributed():
        return method
    device_ids = [device.index] if device.type == "cuda" else None
    no_buffer_sync = {_BUFFER_SYNC_FLAG: False}
    return nn.parallel.DistributedDataParallel(method, device_ids=device_ids, **no_buffer_sync)
