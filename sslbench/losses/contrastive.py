"""Contrastive losses: a positive pair scored against the other images of the batch as negatives
(SimCLR's NT-Xent, Chen et al. 2020, arXiv 2002.05709).

The negatives come from every rank of a distributed run (``gather_with_grad``), the paper's global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.base.collectives import gather_with_grad, rank
from sslbench.losses.precision import at_least_fp32


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent, Chen et al. 2020 (arXiv 2002.05709), Eq. 1 and Algorithm 1.

    ``l(i, j) = -log exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau)`` with cosine
    ``sim``; row ``i`` of ``z1`` and ``z2`` are the positive pair. Scaled as the reference code that
    produced the paper's numbers (google-research/simclr, ``add_contrastive_loss``): ``loss_a + loss_b``,
    the mean over the ``z1`` anchors plus the mean over the ``z2`` anchors, twice Algorithm 1's average
    over all ``2N``. The scale reaches the update wherever nothing normalises it: the biases and norms
    LARS excludes from adaptation, and gradient clipping.
    In a distributed run the anchors are this rank's and the candidates ``k`` are every rank's (the
    paper's global batch); averaged over ranks by DDP this is the one-process loss.
    In fp32: dividing bf16 similarities by tau = 0.1 would magnify their rounding error tenfold.
    """
    n = z1.shape[0]
    z1, z2 = F.normalize(at_least_fp32(z1), dim=-1), F.normalize(at_least_fp32(z2), dim=-1)
    anchors = torch.cat([z1, z2])
    all_z1, all_z2 = gather_with_grad(z1), gather_with_grad(z2)
    candidates = torch.cat([all_z1, all_z2])
    total, offset = all_z1.shape[0], rank() * n
    with torch.autocast(anchors.device.type, enabled=False):  # autocast would run this matmul in bf16
        logits = anchors @ candidates.t() / temperature
    own = torch.arange(n, device=anchors.device) + offset  # where this rank's rows sit among the candidates
    self_columns = torch.cat([own, own + total])
    rows = torch.arange(2 * n, device=anchors.device)
    logits = logits.index_put((rows, self_columns), logits.new_tensor(-torch.inf))
    targets = torch.cat([own + total, own])
    return 2 * F.cross_entropy(logits, targets)  # the mean over 2N rows is (loss_a + loss_b) / 2
