"""Momentum-contrast losses: a query from the online encoder scored against keys from a momentum
encoder (MoCo v1/v2: He et al. 2020, arXiv 1911.05722, and Chen et al. 2020, arXiv 2003.04297;
MoCo v3: Chen, Xie & He 2021, arXiv 2104.02057).

MoCo v1/v2 contrasts each query with its own key and a queue of past keys; the queue is filled with the
keys of every rank of a distributed run (``gather_without_grad``), so all ranks hold the same queue.
MoCo v3 drops the queue and contrasts each query with the current keys of every rank (the global batch),
again gathered without gradient: keys are targets, the momentum encoder is not trained by the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.base.collectives import gather_without_grad, rank
from sslbench.losses.precision import at_least_fp32


def info_nce_with_queue(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE, He et al. 2020 (arXiv 1911.05722), Eq. 1 and Algorithm 1.

    ``L_q = -log exp(q.k+ / T) / (exp(q.k+ / T) + sum_i exp(q.k_i / T))``: ``q`` and ``k`` are
    ``(N, C)`` queries and keys (row ``n`` of each is a positive pair), normalised here; ``queue`` is
    ``(K, C)`` of already-normalised past keys, the negatives. The positive logit is column 0 of
    ``[q.k, q queue^T] / T`` and the loss is the mean cross-entropy over the ``N`` queries, as the
    reference's ``nn.CrossEntropyLoss`` on the logits its builder returns.
    Neither ``k`` nor ``queue`` carries gradient (Algorithm 1: ``k = k.detach()``; the reference reads
    ``queue.clone().detach()``). Call ``enqueue`` after this, so the batch's own keys are not negatives.
    In at least fp32 with autocast off: bf16 similarities divided by T = 0.07 (v1) or 0.2 (v2) would
    magnify their rounding error.
    """
    q = F.normalize(at_least_fp32(q), dim=-1)
    k = F.normalize(at_least_fp32(k.detach()), dim=-1)
    negatives = queue.detach().to(q.dtype)
    with torch.autocast(q.device.type, enabled=False):  # autocast would run these products in bf16
        positive = (q * k).sum(dim=-1, keepdim=True)  # (N, 1)
        negative = q @ negatives.t()  # (N, K)
    logits = torch.cat([positive, negative], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive is column 0
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def enqueue(queue: Tensor, pointer: Tensor, keys: Tensor) -> None:
    """MoCo's dequeue-and-enqueue (Algorithm 1, last lines; the reference's ``_dequeue_and_enqueue``).

    Writes the normalised ``keys`` of every rank, in rank order, over the oldest entries of ``queue``
    ``(K, C)`` starting at row ``pointer`` (a 1-element int64 buffer), then advances the pointer; every
    rank writes the same rows, so the queues stay identical. Unlike the reference (which asserts that
    the global batch divides K) the write wraps around the end of the queue for any K, and a global batch
    larger than the queue keeps only its last K keys, so a small queue works on small data. The rows are
    computed on the pointer's device: no host synchronisation.
    """
    keys = gather_without_grad(F.normalize(at_least_fp32(keys), dim=-1))
    size, batch = queue.shape[0], keys.shape[0]
    kept = min(batch, size)
    start = pointer.reshape(()) + (batch - kept)  # keys beyond the queue's length would be overwritten
    rows = (start + torch.arange(kept, device=pointer.device)) % size
    queue.index_copy_(0, rows.to(queue.device), keys[batch - kept :].to(queue.dtype))
    pointer.copy_((pointer + batch) % size)


def moco_v3_loss(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """MoCo v3's ``ctr(q, k)``, Chen, Xie & He 2021 (arXiv 2104.02057), Algorithm 1 and the reference
    builder's ``contrastive_loss``.

    ``q`` are this rank's ``(N, C)`` queries, ``k`` the momentum encoder's keys of the other view; both
    are normalised, the keys of every rank gathered without gradient, and
    ``logits = q k_all^T / T``. Query ``n`` of rank ``r`` has its positive at column ``r N + n``;
    the mean cross-entropy is scaled by ``2 T`` (Algorithm 1: ``2 * tau * loss``; the paper gives no
    reason, but the T cancels the 1/T the temperature puts on the similarities' gradient). The method
    symmetrises: ``ctr(q1, k2) + ctr(q2, k1)``.
    Averaged over ranks (DDP) this is the one-process loss of the global batch.
    In at least fp32 with autocast off, as ``info_nce_with_queue``.
    """
    n = q.shape[0]
    q = F.normalize(at_least_fp32(q), dim=-1)
    keys = gather_without_grad(F.normalize(at_least_fp32(k), dim=-1))
    with torch.autocast(q.device.type, enabled=False):  # autocast would run this matmul in bf16
        logits = q @ keys.t() / temperature
    labels = torch.arange(n, device=q.device) + rank() * n  # this rank's keys sit at rows rank * N
    return 2 * temperature * F.cross_entropy(logits, labels)
