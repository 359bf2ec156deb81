"""Redundancy-reduction losses: the two views' embeddings made invariant to each other while their
dimensions are decorrelated, with no negatives and no target network (Barlow Twins, Zbontar et al. 2021,
arXiv 2103.03230; VICReg, Bardes et al. 2022, arXiv 2105.04906).

Both compute statistics over the paper's global batch: Barlow Twins' standardisation and
cross-correlation are sums over every rank (``all_reduce_sum_with_grad``), VICReg's variance and
covariance are taken on the embeddings gathered from every rank (``gather_with_grad``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.base.collectives import all_reduce_sum_with_grad, gather_with_grad
from sslbench.base.errors import SSLBenchError
from sslbench.losses.precision import at_least_fp32

BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm1d's default, the reference's normalisation of z1 and z2


def off_diagonal(matrix: Tensor) -> Tensor:
    """The off-diagonal entries of a square ``(n, n)`` matrix, flattened (``n * (n - 1)`` values).

    Dropping the first entry leaves ``n * n - 1 = (n - 1) * (n + 1)`` values; as ``n - 1`` rows of
    ``n + 1`` each row starts just right of a diagonal entry and ends on the next one, so dropping every
    row's last column drops exactly the diagonal. A view where ``matrix`` is contiguous: no mask to build.
    """
    n, m = matrix.shape
    if n != m:
        raise SSLBenchError(f"off_diagonal needs a square matrix; got shape {tuple(matrix.shape)}")
    return matrix.reshape(-1)[1:].reshape(n - 1, n + 1)[:, :-1].reshape(-1)


def _check_pair(name: str, a: Tensor, b: Tensor) -> None:
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] < 1:
        raise SSLBenchError(
            f"{name} needs two (N, D) embeddings of the same shape with N >= 1; "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _at_least_fp32_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Both in one dtype, at least fp32: the losses compare and multiply the two views entry by entry."""
    dtype = torch.promote_types(at_least_fp32(a).dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _standardise_over_ranks(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Every column of ``z`` less its mean over the global batch, divided by ``sqrt(biased var + eps)``,
    and the global batch size: affine-free SyncBatchNorm in training mode, differentiable across ranks.

    Two passes (global mean, then the global sum of squared deviations from it) rather than
    ``E[z^2] - E[z]^2``, which cancels catastrophically in fp32 when a column's mean dwarfs its spread.
    """
    rows = z.new_tensor([float(z.shape[0])])
    sums = all_reduce_sum_with_grad(torch.cat([z.sum(dim=0), rows]))  # the count rides in the same call
    count = sums[-1].detach()
    centred = z - sums[:-1] / count
    var = all_reduce_sum_with_grad(centred.square().sum(dim=0)) / count
    return centred * torch.rsqrt(var + eps), count


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambda_offdiag: float = 0.0051) -> Tensor:
    """Barlow Twins, Zbontar et al. 2021 (arXiv 2103.03230), Eq. 1-2 and Algorithm 1.

    ``L = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2`` with ``C`` the cross-correlation of
    the two views' embeddings, each dimension standardised over the batch (Eq. 2). ``z1`` and ``z2`` are
    ``(N, D)``, row ``b`` of each the two views of one image.

    The standardisation is the reference code's (facebookresearch/barlowtwins, ``BarlowTwins.forward``):
    an affine-free BatchNorm made SyncBatchNorm, so mean and biased variance (eps 1e-5) of the global
    batch over every rank, and ``C = z1n^T z2n / N_global`` summed over ranks. Algorithm 1 divides by
    ``z.std(0)`` instead (unbiased, no eps), which scales ``C`` by ``(N - 1) / N``: it moves the optimum
    of the on-diagonal term, so the reference is followed.

    Every rank computes the same loss from the global sums. Their backward (``all_reduce_sum_with_grad``)
    sums the upstream gradient over ranks, so that, once DDP averages the ranks' gradients, each rank
    holds the one-process gradient on the whole batch. The reference's plain ``all_reduce`` has no
    backward: each rank's backward yields the one-process gradient for its own rows only, and DDP's
    averaging then divides it by the world size, leaving ``1 / world`` of the one-process gradient.
    Computed in at least fp32 with autocast off for the matmul: ``C``'s diagonal is compared with 1 and
    its ``D^2`` squared entries are summed, where bf16 rounding would dominate the off-diagonal term.
    """
    _check_pair("barlow_twins_loss", z1, z2)
    dim = z1.shape[1]
    z1, z2 = _at_least_fp32_pair(z1, z2)
    standardised, count = _standardise_over_ranks(torch.cat([z1, z2], dim=1), BATCH_NORM_EPS)
    z1n, z2n = standardised.split(dim, dim=1)
    with torch.autocast(z1n.device.type, enabled=False):  # autocast would run this matmul in bf16
        c = all_reduce_sum_with_grad(z1n.t() @ z2n / count)
    on_diag = (1 - torch.diagonal(c)).square().sum()
    off_diag = off_diagonal(c).square().sum()
    return on_diag + lambda_offdiag * off_diag


def _variance_term(z: Tensor, eps: float) -> Tensor:
    """VICReg's Eq. 1: ``mean_j relu(gamma - sqrt(Var(z^j) + eps))`` with ``gamma = 1``, unbiased Var."""
    return F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()


def _covariance_term(z_centred: Tensor) -> Tensor:
    """VICReg's Eq. 3-4: ``C = Z^T Z / (N - 1)`` of the centred embeddings, ``sum_{i != j} C_ij^2 / D``."""
    n, dim = z_centred.shape
    with torch.autocast(z_centred.device.type, enabled=False):  # autocast would run this matmul in bf16
        cov = z_centred.t() @ z_centred / (n - 1)
    return off_diagonal(cov).square().sum() / dim


def vicreg_loss(
    x: Tensor,
    y: Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
) -> Tensor:
    """VICReg, Bardes et al. 2022 (arXiv 2105.04906), Eq. 1-6 and Algorithm 1, scaled as the reference
    code (facebookresearch/vicreg, ``VICReg.forward``) that produced the paper's numbers.

    - invariance: ``F.mse_loss(x, y)`` on this rank's rows, the mean over the ``N * D`` entries
      (Algorithm 1; Eq. 5 sums over ``D``, i.e. is ``D`` times larger);
    - variance (Eq. 1-2): ``(v(x) + v(y)) / 2``, the reference's halving of Eq. 6's ``v(Z) + v(Z')``:
      its ``std_coeff = 25`` is the paper's ``mu = 12.5``;
    - covariance (Eq. 3-4): ``c(x) + c(y)``.

    Variance and covariance are taken over the global batch: ``x`` and ``y`` are gathered from every rank
    with gradient (the reference's ``FullGatherLayer``, whose backward sums each slice's gradient over the
    ranks), so with DDP's average every rank holds the one-process gradient, and the mean of the ranks'
    losses is the one-process loss (equal per-rank batches). Centred before the variance, as the
    reference does (the unbiased variance is unchanged by it).
    In at least fp32 with autocast off for the covariance matmuls.
    """
    _check_pair("vicreg_loss", x, y)
    x, y = _at_least_fp32_pair(x, y)
    invariance = F.mse_loss(x, y)
    x, y = gather_with_grad(x), gather_with_grad(y)
    if x.shape[0] < 2:
        raise SSLBenchError(f"vicreg_loss needs at least 2 rows over all ranks; got {x.shape[0]}")
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    variance = (_variance_term(x, eps) + _variance_term(y, eps)) / 2
    covariance = _covariance_term(x) + _covariance_term(y)
    return sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
