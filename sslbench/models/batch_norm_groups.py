"""BatchNorm whose statistics are taken over groups of the global batch: MoCo's shuffling BN, on any
number of ranks.

MoCo (He et al. 2020, arXiv 1911.05722, Sec. 3.3) normalises each GPU's 32 images on their own, and
computes the keys on a batch shuffled across the GPUs, so a query and its positive key are normalised
with statistics of different images: otherwise a query can find its key among the queue's by the
batch-statistics signature they share, and the pretext task is solved without learning. Here the groups
are a function of an image's index in the global batch, not of the rank that holds it, so one process,
2 ranks and 8 ranks normalise every image alike: each group's sums are all-reduced over the ranks
(differentiably, as SyncBatchNorm's).

``contiguous_groups`` gives the queries' groups (images ``0..S-1``, ``S..2S-1``, ...: the reference's
per-GPU batches) and ``strided_groups`` the keys' (images ``g, g + G, g + 2G, ...``: a fixed shuffle),
so a query's group and its key's share ``1/G`` of their images, as the reference's random shuffle over
``G`` GPUs does in expectation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.base.collectives import all_reduce_sum_with_grad, rank, world_size


class GroupedBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, while ``group_of_rows`` is set, normalises each group of rows with that
    group's statistics over every rank; otherwise (evaluation, other callers) plain BatchNorm.

    The running statistics average the groups' (the mean of their means and of their unbiased
    variances), as the reference's per-GPU BatchNorms each update theirs. The state dict is
    BatchNorm2d's, so a trained backbone loads into a plain one.
    """

    group_of_rows: Tensor | None = None  # (local batch,) group index of each row
    num_groups: int = 0

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.group_of_rows is None:
            return super().forward(input)
        groups, rows = self.num_groups, self.group_of_rows.to(input.device)
        x = input.float()  # statistics in fp32 under bf16 autocast, as BatchNorm keeps them
        spatial = x[0, 0].numel()
        membership = F.one_hot(rows, groups).to(x.dtype).t()  # (G, n)
        sums = membership @ x.sum(dim=(2, 3))  # (G, C)
        squares = membership @ (x * x).sum(dim=(2, 3))
        counts = membership.sum(dim=1, keepdim=True) * spatial  # (G, 1)
        totals = all_reduce_sum_with_grad(torch.cat([sums, squares, counts], dim=1))
        sums, squares, counts = totals.split([x.shape[1], x.shape[1], 1], dim=1)
        mean = sums / counts
        var = (squares / counts - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                unbiased = var * counts / (counts - 1).clamp_min(1)
                momentum = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.mean(dim=0), momentum)
                self.running_var.lerp_(unbiased.mean(dim=0), momentum)
                self.num_batches_tracked.add_(1)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale + (self.bias if self.affine else 0.0)
        out = x * scale[rows][:, :, None, None] + shift[rows][:, :, None, None]
        return out.to(input.dtype)


def use_grouped_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by a ``GroupedBatchNorm`` with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            grouped = GroupedBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            grouped.load_state_dict(child.state_dict())
            grouped.to(next(child.buffers(), torch.empty(0)).device)
            if child.affine:
                grouped.weight.requires_grad_(child.weight.requires_grad)
                grouped.bias.requires_grad_(child.bias.requires_grad)
            grouped.train(child.training)
            setattr(module, name, grouped)
        else:
            use_grouped_batch_norm(child)
    return module


def _global_rows(local_batch: int, device: torch.device) -> Tensor:
    """The global-batch index of each local row: rank r holds images r, r + W, ... (``rank_rows``)."""
    return torch.arange(local_batch, device=device) * world_size() + rank()


def contiguous_groups(local_batch: int, num_groups: int, device: torch.device) -> Tensor:
    """Groups of consecutive images of the global batch: the reference's per-GPU batches."""
    global_batch = local_batch * world_size()
    return _global_rows(local_batch, device) * num_groups // global_batch


def strided_groups(local_batch: int, num_groups: int, device: torch.device) -> Tensor:
    """Every ``num_groups``-th image of the global batch: a fixed shuffle of ``contiguous_groups``."""
    return _global_rows(local_batch, device) % num_groups


@contextmanager
def batch_norm_groups(module: nn.Module, group_of_rows: Tensor, num_groups: int) -> Iterator[None]:
    """Within the block, every ``GroupedBatchNorm`` of ``module`` normalises by the given groups."""
    layers = [m for m in module.modules() if isinstance(m, GroupedBatchNorm)]
    for layer in layers:
        layer.group_of_rows, layer.num_groups = group_of_rows, num_groups
    try:
        yield
    finally:
        for layer in layers:
            layer.group_of_rows, layer.num_groups = None, 0
