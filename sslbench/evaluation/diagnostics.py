"""Collapse diagnostics: is it learning, or has every image been mapped to the same point?

- ``embedding_std``: mean over dimensions of the per-dimension std of L2-normalised embeddings
  (SimSiam, Chen & He 2021, Sec. 4.1): 0 when collapsed, about ``1/sqrt(d)`` when spread out.
- ``effective_rank``: RankMe (Garrido et al. 2023, arXiv 2210.02885), ``exp(H(sigma / ||sigma||_1))``
  of the singular values: 1 for a collapse onto one direction, up to ``min(n, d)``.
- For DINO, the entropy of the teacher's output distribution and the KL divergence from teacher to
  student (the two curves of the DINO paper's collapse study, Sec. 5.3 / Fig. 7): uniform collapse
  has entropy ``ln K``, one-dimension collapse entropy 0, and in both the KL falls to 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.base.collapse_criteria import COLLAPSE_ENTROPY_EDGE, COLLAPSE_KL, COLLAPSE_STD_RATIO


@torch.no_grad()
def embedding_std(embeddings: Tensor) -> tuple[float, float]:
    """(mean per-dimension std of the L2-normalised embeddings, the healthy value 1/sqrt(d))."""
    z = F.normalize(embeddings.detach().float().flatten(1), dim=-1)
    return float(z.std(dim=0).mean()), 1.0 / math.sqrt(z.shape[1])


@torch.no_grad()
def effective_rank(embeddings: Tensor, eps: float = 1e-7) -> float:
    """RankMe: the exponential of the entropy of the normalised singular values."""
    singular = torch.linalg.svdvals(embeddings.detach().float().flatten(1))
    p = singular / (singular.sum() + eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def entropy(probs: Tensor) -> Tensor:
    """Mean entropy (nats) of the rows of a probability matrix."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()


@torch.no_grad()
def kl_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Mean KL(p || q) (nats) over rows of two probability matrices."""
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(dim=-1).mean()


def embedding_diagnostics(embeddings: Tensor) -> dict[str, float]:
    std, healthy = embedding_std(embeddings)
    return {
        "embedding_std": std,
        "embedding_std_healthy": healthy,
        "effective_rank": effective_rank(embeddings),
    }


def collapse_verdict(record: dict[str, Any], num_outputs: int | None = None) -> dict[str, Any]:
    """Whether the last logged diagnostics show a collapse, why, and the likely fix, in plain words."""
    reasons: list[str] = []
    std, healthy = record.get("embedding_std"), record.get("embedding_std_healthy")
    if std is not None and healthy and std / healthy < COLLAPSE_STD_RATIO:
        reasons.append(
            f"embeddings collapsed: their spread is {std / healthy:.3f} of a healthy one "
            f"(threshold {COLLAPSE_STD_RATIO}), so images map to nearly the same point"
        )
    kl, ent = record.get("teacher_student_kl"), record.get("teacher_entropy")
    if kl is not None and ent is not None and num_outputs and kl < COLLAPSE_KL:
        log_k = math.log(num_outputs)
        if ent > (1 - COLLAPSE_ENTROPY_EDGE) * log_k:
            reasons.append(f"uniform collapse: teacher entropy {ent:.3f} ~ ln K = {log_k:.3f}, KL {kl:.1e}")
        elif ent < COLLAPSE_ENTROPY_EDGE * log_k:
            reasons.append(f"one-dimension collapse: teacher entropy {ent:.3f} ~ 0 and KL {kl:.1e}")
    verdict: dict[str, Any] = {"collapsed": bool(reasons), "reasons": reasons}
    if reasons:
        verdict["advice"] = (
            "likely fix: keep both centering and sharpening (DINO), a momentum teacher, a lower lr, "
            "or a longer warm-up"
        )
    keys = (
        "embedding_std",
        "embedding_std_healthy",
        "effective_rank",
        "teacher_entropy",
        "teacher_student_kl",
    )
    verdict.update({key: record[key] for key in keys if key in record})
    return verdict
