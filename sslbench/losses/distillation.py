"""Self-distillation losses: DINO's cross-entropy between a centred, sharpened teacher and the student,
its MSE ablation, and the center update (Caron et al. 2021, arXiv 2104.14294).

The center averages the teacher outputs of every rank of a distributed run (``all_reduce_mean``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.base.collectives import all_reduce_mean
from sslbench.losses.precision import at_least_fp32


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
    teacher_probs = [
        F.softmax((at_least_fp32(t.detach()) - center) / teacher_temp, dim=-1) for t in teacher_out
    ]
    student_logp = [F.log_softmax(at_least_fp32(s) / student_temp, dim=-1) for s in student_out]
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
    batch_center = all_reduce_mean(at_least_fp32(torch.cat(teacher_out)).mean(dim=0, keepdim=True))
    return center * momentum + batch_center * (1.0 - momentum)
