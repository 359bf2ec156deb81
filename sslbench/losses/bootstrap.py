"""Bootstrap losses: a prediction regressed onto a target network's projection, with no negatives
(BYOL, Grill et al. 2020, arXiv 2006.07733)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from sslbench.losses.precision import at_least_fp32


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL, Grill et al. 2020 (arXiv 2006.07733), Eq. 2: ``2 - 2 <q, z'> / (||q|| ||z'||)``.

    One direction, averaged over the batch; the target carries no gradient. The method sums both
    directions (the symmetrised ``L + L~`` of the paper).
    """
    q = F.normalize(at_least_fp32(prediction), dim=-1)
    z = F.normalize(at_least_fp32(target.detach()), dim=-1)
    return (2 - 2 * (q * z).sum(dim=-1)).mean()
