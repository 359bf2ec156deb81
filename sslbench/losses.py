"""The papers' loss functions as plain functions of tensors, each tested against the paper's pseudo-code.

Methods call these; nothing here knows about backbones, views or the runner. Where a paper computes a
quantity over the whole batch (DINO's center, SimCLR's negatives), it is computed over every rank of a
distributed run (``sslbench.distributed``); in one process those calls are the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.distributed import all_reduce_mean, gather_with_grad, rank


def _fp32(x: Tensor) -> Tensor:
    """At least fp32 (bf16/fp16 are promoted, fp64 kept): losses are computed outside autocast precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dino_pairs(
    student_out: list[Tensor],
    teacher_out: list[Tensor],
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
) -> list[tuple[Tensor, Tensor]]:
    """``(P_t(x), log P_s(x'))`` for every teacher global view ``x`` and every other student view ``x'``.

    The teacher side is centred, sharpened and carries no gradient. Computed in fp32 whatever the autocast
    precision: a sharp softmax at T = 0.04 amplifies bf16 rounding.
    """
    teacher_probs = [F.softmax((_fp32(t.detach()) - center) / teacher_temp, dim=-1) for t in teacher_out]
    student_logp = [F.log_softmax(_fp32(s) / student_temp, dim=-1) for s in student_out]
    return [
        (q, logp)
        for t_idx, q in enumerate(teacher_probs)
        for s_idx, logp in enumerate(student_logp)
        if s_idx != t_idx  # same view for teacher and student: skipped
    ]


def dino_loss(
    student_out: list[Tensor],
    teacher_out: list[Tensor],
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
) -> Tensor:
    """DINO cross-entropy, Caron et al. 2021 (arXiv 2104.14294), Eq. 1-3 and Algorithm 1.

    ``P_t = softmax((g_t(x) - C) / tau_t)``, ``P_s = softmax(g_s(x') / tau_s)`` and the loss
    ``sum_{x in {x1_g, x2_g}} sum_{x' in V, x' != x} H(P_t(x), P_s(x'))`` averaged over the pairs,
    where ``H(a, b) = -a log b``. ``student_out`` holds one ``(B, K)`` tensor per crop, global crops
    first; ``teacher_out`` one per global crop.
    """
    pairs = dino_pairs(student_out, teacher_out, center, student_temp, teacher_temp)
    return torch.stack([torch.sum(-q * logp, dim=-1).mean() for q, logp in pairs]).mean()


def dino_mse_loss(
    student_out: list[Tensor],
    teacher_out: list[Tensor],
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
) -> Tensor:
    """DINO's ablation (Table 7, "MSE"): ``||P_t(x) - P_s(x')||^2`` in place of ``H``, over the same pairs."""
    pairs = dino_pairs(student_out, teacher_out, center, student_temp, teacher_temp)
    return torch.stack([((q - logp.exp()) ** 2).sum(dim=-1).mean() for q, logp in pairs]).mean()


@torch.no_grad()
def updated_center(center: Tensor, teacher_out: list[Tensor], momentum: float) -> Tensor:
    """DINO's centering (Eq. 4): ``C <- m C + (1 - m) mean_batch(g_t(x))``, over every global crop of
    every rank."""
    batch_center = all_reduce_mean(_fp32(torch.cat(teacher_out)).mean(dim=0, keepdim=True))
    return center * momentum + batch_center * (1.0 - momentum)


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL, Grill et al. 2020 (arXiv 2006.07733), Eq. 2: ``2 - 2 <q, z'> / (||q|| ||z'||)``.

    One direction, averaged over the batch; the target carries no gradient. The method sums both
    directions (the symmetrised ``L + L~`` of the paper).
    """
    q = F.normalize(_fp32(prediction), dim=-1)
    z = F.normalize(_fp32(target.detach()), dim=-1)
    return (2 - 2 * (q * z).sum(dim=-1)).mean()


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent, Chen et al. 2020 (arXiv 2002.05709), Eq. 1 and Algorithm 1.

    ``l(i, j) = -log exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau)`` with cosine
    ``sim``, averaged over all ``2N`` anchors; row ``i`` of ``z1`` and ``z2`` are the positive pair.
    In a distributed run the anchors are this rank's and the candidates ``k`` are every rank's (the
    paper's global batch); averaged over ranks by DDP this is the one-process loss.
    In fp32: dividing bf16 similarities by tau = 0.1 would magnify their rounding error tenfold.
    """
    n = z1.shape[0]
    z1, z2 = F.normalize(_fp32(z1), dim=-1), F.normalize(_fp32(z2), dim=-1)
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
    return F.cross_entropy(logits, targets)
