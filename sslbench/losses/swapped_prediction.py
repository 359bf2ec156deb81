"""Swapped prediction: SwAV's codes, an equal partition of the batch among the prototypes computed by
Sinkhorn-Knopp, and the loss that predicts the codes of one crop from every other crop (Caron et al. 2020,
arXiv 2006.09882). The same Sinkhorn-Knopp centres DINOv2's teacher in place of DINO's running center
(Oquab et al. 2023, arXiv 2304.07193), with the teacher temperature as epsilon.

The partition is over the global batch: Sinkhorn's sums run over every rank (``all_reduce_sum``), as in
the reference ``distributed_sinkhorn``; in one process those calls are the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.base.collectives import all_reduce_sum, gather_without_grad, world_size
from sslbench.losses.precision import at_least_fp32


def _global_prototype_max(scores: Tensor, keep: Tensor | None) -> Tensor:
    """Each prototype's largest score over the counted rows of every rank, ``(1, K)`` (0 where none).

    Subtracting it keeps ``exp(scores / eps)`` at most 1, so logits far larger than the reference's
    cosine scores (DINOv2's teacher at T = 0.04) cannot overflow fp32. A factor per prototype is removed
    exactly by the first row normalisation, so the codes are unchanged.
    """
    masked = scores if keep is None else scores.masked_fill(~keep, -torch.inf)
    if scores.shape[0] > 0:
        local = masked.amax(dim=0, keepdim=True)
    else:  # a rank without rows (DINOv2: no masked patch here) still joins the collective
        local = scores.new_full((1, scores.shape[1]), -torch.inf)
    top = gather_without_grad(local).amax(dim=0, keepdim=True)
    return torch.where(torch.isfinite(top), top, torch.zeros_like(top))


@torch.no_grad()
def sinkhorn_knopp(
    scores: Tensor, epsilon: float, iterations: int = 3, valid: Tensor | None = None
) -> Tensor:
    """Codes that split the global batch equally among the prototypes: SwAV Sec. 3.1 and Algorithm 1.

    ``Q* = Diag(u) exp(C^T Z / eps) Diag(v)`` with ``Q`` in the transportation polytope: each of
    the ``K`` prototypes (rows) gets mass ``1/K`` and each of the ``B`` samples (columns) ``1/B``, reached
    by alternating the row and column normalisations ``iterations`` times (3 in the paper). ``B`` counts
    the rows of every rank, and the row sums are all-reduced, so each rank gets its rows of the codes of
    one process on the whole batch. Returned as ``(B_local, K)`` rows summing to 1 (``Q * B``, transposed):
    soft codes, not rounded (Sec. 3.1).

    SwAV: ``scores`` are the prototype scores ``z^T c``, ``epsilon = 0.05``. DINOv2: ``scores`` are the
    teacher's logits and ``epsilon`` the teacher temperature (``sinkhorn_knopp_teacher``). ``valid``
    (bool, ``B_local``) counts only those rows, for DINOv2's masked patches (``ibot_patch_loss``): ``B``
    is then the number of valid rows over every rank, which may differ between ranks; other rows get
    zero codes. Without ``valid``, ``B`` is ``B_local * world_size``, every rank holding as many rows.
    ``B`` scales every column alike and cancels in the codes; it must only be the same on every rank.

    In at least fp32 and without gradient: the codes are targets. The reference first divides ``Q`` by
    its total; the row normalisation removes any scalar factor, so that step is skipped.
    """
    if iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs at least one iteration, got {iterations}")
    if epsilon <= 0:
        raise ValueError(f"sinkhorn_knopp needs epsilon > 0, got {epsilon}")
    scores = at_least_fp32(scores.detach())
    n_prototypes = scores.shape[1]
    keep = None if valid is None else valid.to(device=scores.device, dtype=torch.bool).reshape(-1, 1)
    if keep is None:
        n_samples: Tensor | int = scores.shape[0] * world_size()
    else:  # DINOv2 all-reduces its count of masked patches
        n_samples = all_reduce_sum(keep.sum().to(scores.dtype)).clamp_min(1.0)
    q = torch.exp((scores - _global_prototype_max(scores, keep)) / epsilon)
    if keep is not None:
        q = q.masked_fill_(~keep, 0.0)
    q = q.t()  # (K, B) as in the paper
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(iterations):
        # rows: each prototype's mass over the global batch is 1/K
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(tiny)
        q /= n_prototypes
        # columns: each sample's mass is 1/B (a sample's column is on its own rank)
        column = q.sum(dim=0, keepdim=True)
        if keep is not None:
            column = column.masked_fill(~keep.t(), 1.0)
        q /= column.clamp_min(torch.finfo(q.dtype).tiny)  # a sample far below every prototype: no 0/0
        q /= n_samples
    q *= n_samples  # columns sum to 1: each sample's code is a distribution over the prototypes
    return q.t()


def codes_with_queue(scores: Tensor, queue_scores: Tensor | None, epsilon: float, iterations: int) -> Tensor:
    """Codes of ``scores`` computed with the scores of a queue of past embeddings (SwAV Sec. 3.1, "working
    with small batches"): Sinkhorn over ``[queue_scores; scores]``, the queue first as in the reference
    ``main_swav.py``, keeping the last ``B`` rows.

    ``queue_scores`` are this rank's queued embeddings scored against the current prototypes; each rank
    holds its own ``queue_length / world_size`` of them, so the partition is over every rank's queue and
    batch. ``None`` (queue not started, or not yet full: the reference waits until its last row is
    filled) gives the codes of the batch alone.
    """
    if queue_scores is None:
        return sinkhorn_knopp(scores, epsilon, iterations)
    joint = torch.cat([queue_scores.detach(), scores.detach()])
    return sinkhorn_knopp(joint, epsilon, iterations)[queue_scores.shape[0] :]


def swav_loss(scores: list[Tensor], codes: list[Tensor], temperature: float) -> Tensor:
    """SwAV's swapped prediction, Caron et al. 2020 (arXiv 2006.09882), Eq. 1-3 with multi-crop (Sec. 3.2)
    as the reference loop computes it.

    ``l(z_v, q_i) = -sum_k q_i^(k) log p_v^(k)`` with ``p_v = softmax(z_v^T C / tau)`` (Eq. 2): the codes
    of crop ``i`` predicted from the scores of every other crop ``v``. ``scores`` holds one ``(B, K)``
    tensor of prototype scores per crop, global crops first; ``codes[i]`` are the Sinkhorn codes of crop
    ``i`` (the crops used for assignment, usually the 2 global ones). As the reference ``main_swav.py``:
    for each ``i``, the sum over ``v != i`` of the batch mean, divided by ``n_crops - 1``; then the mean
    over ``i``. The codes carry no gradient (Sec. 3.1: the gradient goes through the predictions only).
    In fp32: ``tau = 0.1`` magnifies bf16 rounding.
    """
    n_crops = len(scores)
    if n_crops < 2:
        raise ValueError(f"swav_loss needs at least 2 crops, got {n_crops}")
    if not 1 <= len(codes) <= n_crops:
        raise ValueError(
            f"swav_loss needs between 1 and {n_crops} codes (one per assigned crop), got {len(codes)}"
        )
    log_probs = [F.log_softmax(at_least_fp32(s) / temperature, dim=-1) for s in scores]
    per_code = []
    for i, code in enumerate(codes):
        q = at_least_fp32(code.detach())
        cross = [-(q * log_probs[v]).sum(dim=-1).mean() for v in range(n_crops) if v != i]
        per_code.append(torch.stack(cross).sum() / (n_crops - 1))
    return torch.stack(per_code).mean()
