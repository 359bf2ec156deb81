"""The redundancy-reduction losses checked against implementations written here from the papers.

- Barlow Twins: Zbontar et al. 2021 (arXiv 2103.03230), Algorithm 1, and the reference code's
  affine-free BatchNorm (facebookresearch/barlowtwins, ``BarlowTwins.forward``).
- VICReg: Bardes et al. 2022 (arXiv 2105.04906), Algorithm 1, with the reference code's halved variance
  term (facebookresearch/vicreg, ``VICReg.forward``).
- Both on 2 gloo ranks against one process on the whole batch (``tests/two_ranks.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from two_ranks import loss_and_grads_in_one_process, loss_and_grads_on_ranks

from sslbench.base.errors import SSLBenchError
from sslbench.losses.redundancy_reduction import barlow_twins_loss, off_diagonal, vicreg_loss

F64 = torch.float64
SIZES = [(8, 4), (32, 16), (64, 5)]
LAMBDA = 0.0051


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(seed: int, n: int, d: int, scale: float = 1.0, shift: float = 0.0) -> tuple[torch.Tensor, ...]:
    """Two correlated views: a shared signal plus noise of its own for each."""
    gen = _gen(seed)
    base = torch.randn(n, d, generator=gen, dtype=F64)
    z1 = base + 0.7 * torch.randn(n, d, generator=gen, dtype=F64)
    z2 = base + 0.7 * torch.randn(n, d, generator=gen, dtype=F64)
    return z1 * scale + shift, z2 * scale + shift


def _off_diagonal_mask(m: torch.Tensor) -> torch.Tensor:
    return m[~torch.eye(m.shape[0], dtype=torch.bool)]


def _orthogonal_columns(seed: int, n: int, d: int) -> torch.Tensor:
    """``(n, d)`` with centred, mutually orthogonal columns of biased variance 1 (QR of centred noise:
    the columns of ``Q`` span the centred columns' space, orthogonal to the all-ones vector)."""
    x = torch.randn(n, d, generator=_gen(seed), dtype=F64)
    q, _ = torch.linalg.qr(x - x.mean(dim=0))
    return q * n**0.5


# --------------------------------------------------------------------------------------------------------
# Barlow Twins
# --------------------------------------------------------------------------------------------------------


def _algorithm_1_barlow(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float, correction: int) -> torch.Tensor:
    """Algorithm 1 of the Barlow Twins paper, verbatim up to naming; ``correction`` picks the std:
    1 is the paper's ``z.std(0)``, 0 the biased std that BatchNorm uses."""
    n, d = z_a.shape
    z_a_norm = (z_a - z_a.mean(0)) / z_a.std(0, correction=correction)
    z_b_norm = (z_b - z_b.mean(0)) / z_b.std(0, correction=correction)
    c = torch.mm(z_a_norm.T, z_b_norm) / n
    c_diff = (c - torch.eye(d, dtype=c.dtype)).pow(2)
    c_diff[~torch.eye(d, dtype=torch.bool)] *= lambd
    return c_diff.sum()


def _reference_code_barlow(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """The reference module's forward on one process: ``BatchNorm1d(affine=False)`` in training mode."""
    bn = torch.nn.BatchNorm1d(z1.shape[1], affine=False, dtype=z1.dtype).train()
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    return (torch.diagonal(c) - 1).pow(2).sum() + lambd * _off_diagonal_mask(c).pow(2).sum()


@pytest.mark.parametrize(("n", "d"), SIZES)
@pytest.mark.parametrize("lambd", [LAMBDA, 0.5])
def test_barlow_twins_matches_the_reference_code(n: int, d: int, lambd: float):
    z1, z2 = _pair(n * d, n, d, scale=2.0, shift=-1.0)
    expected = _reference_code_barlow(z1, z2, lambd)
    torch.testing.assert_close(barlow_twins_loss(z1, z2, lambd), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("n", "d"), SIZES)
def test_barlow_twins_matches_algorithm_1_with_the_biased_std(n: int, d: int):
    """Algorithm 1 divides by the unbiased std without eps; the reference's BatchNorm by
    ``sqrt(biased var + 1e-5)``. Bessel's factor scales ``C`` by ``(n - 1) / n`` and is taken out exactly
    (``correction=0``). The eps shrinks each ``C_ij`` by a factor within ``[1 - r, 1]``, ``r = eps / min
    var``, with ``|C_ij| <= 1``; so each diagonal term moves by at most ``4 r`` and each off-diagonal one
    by ``2 r``: the tolerance is ``r (4 d + 2 lambda d (d - 1))``. Inputs of variance ~100 keep ``r``
    ~1e-7, and the unbiased pseudo-code, verbatim, lies well outside that tolerance."""
    z1, z2 = _pair(7 + n, n, d, scale=10.0, shift=3.0)
    r = 1e-5 / min(z1.var(0, correction=0).min().item(), z2.var(0, correction=0).min().item())
    tolerance = r * (4 * d + 2 * LAMBDA * d * (d - 1))
    ours = barlow_twins_loss(z1, z2, LAMBDA)
    assert abs(ours - _algorithm_1_barlow(z1, z2, LAMBDA, correction=0)).item() <= tolerance
    assert abs(ours - _algorithm_1_barlow(z1, z2, LAMBDA, correction=1)).item() > 100 * tolerance


def test_barlow_twins_of_identical_decorrelated_inputs_is_near_zero():
    """Identical views with centred, orthogonal, unit-variance dimensions: ``C = I / (1 + eps)``, so the
    loss is ``d (1 - 1 / (1 + eps))^2 ~ d 1e-10``; opposite views give ``C = -I``, loss ~ ``4 d``."""
    n, d = 32, 8
    z = _orthogonal_columns(0, n, d)
    eps = 1e-5
    loss = barlow_twins_loss(z, z.clone())
    assert loss.item() < 1e-8
    torch.testing.assert_close(loss, torch.tensor(d * (1 - 1 / (1 + eps)) ** 2, dtype=F64))
    torch.testing.assert_close(barlow_twins_loss(z, -z), torch.tensor(4.0 * d, dtype=F64), rtol=1e-4, atol=0)
    z1, z2 = _pair(1, n, d)
    assert barlow_twins_loss(z1, z2) > 100 * barlow_twins_loss(z, z.clone())


def test_barlow_twins_ignores_a_per_dimension_shift_and_positive_scale():
    """Each dimension is standardised over the batch: the loss is invariant to ``a_j z^j + b_j``
    (``a_j > 0``) up to the eps, and its gradient sums to 0 over the batch in every dimension."""
    n, d = 48, 6
    z1, z2 = _pair(3, n, d, scale=5.0)
    gen = _gen(4)
    a, b = torch.rand(d, generator=gen, dtype=F64) + 0.5, torch.randn(d, generator=gen, dtype=F64) * 10
    torch.testing.assert_close(
        barlow_twins_loss(z1 * a + b, z2), barlow_twins_loss(z1, z2), rtol=1e-6, atol=0
    )
    z1.requires_grad_(True)
    barlow_twins_loss(z1, z2).backward()
    torch.testing.assert_close(z1.grad.sum(0), torch.zeros(d, dtype=F64), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# VICReg
# --------------------------------------------------------------------------------------------------------


def _algorithm_1_vicreg(
    z_a: torch.Tensor, z_b: torch.Tensor, lambd: float, mu: float, nu: float
) -> torch.Tensor:
    """Algorithm 1 of the VICReg paper, verbatim up to naming."""
    n, d = z_a.shape
    sim_loss = F.mse_loss(z_a, z_b)
    std_z_a = torch.sqrt(z_a.var(dim=0) + 1e-04)
    std_z_b = torch.sqrt(z_b.var(dim=0) + 1e-04)
    std_loss = torch.mean(F.relu(1 - std_z_a)) + torch.mean(F.relu(1 - std_z_b))
    z_a = z_a - z_a.mean(dim=0)
    z_b = z_b - z_b.mean(dim=0)
    cov_z_a = (z_a.T @ z_a) / (n - 1)
    cov_z_b = (z_b.T @ z_b) / (n - 1)
    cov_loss = _off_diagonal_mask(cov_z_a).pow(2).sum() / d + _off_diagonal_mask(cov_z_b).pow(2).sum() / d
    return lambd * sim_loss + mu * std_loss + nu * cov_loss


@pytest.mark.parametrize(("n", "d"), SIZES)
@pytest.mark.parametrize(("sim", "std", "cov"), [(25.0, 25.0, 1.0), (1.0, 3.0, 7.0)])
def test_vicreg_matches_algorithm_1(n: int, d: int, sim: float, std: float, cov: float):
    """The reference code halves Algorithm 1's ``std_loss``: ``std_coeff = s`` is the paper's ``mu = s / 2``.
    Scales spread around 1 so that some dimensions' std is below 1 (the hinge active) and some above."""
    x, y = _pair(n + d, n, d)
    scales = torch.linspace(0.2, 2.0, d, dtype=F64)
    x, y = x * scales, y * scales.flip(0)
    expected = _algorithm_1_vicreg(x, y, lambd=sim, mu=std / 2, nu=cov)
    got = vicreg_loss(x, y, sim_coeff=sim, std_coeff=std, cov_coeff=cov)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _variance_only(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return vicreg_loss(x, y, sim_coeff=0.0, std_coeff=1.0, cov_coeff=0.0)


def _covariance_only(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return vicreg_loss(x, y, sim_coeff=0.0, std_coeff=0.0, cov_coeff=1.0)


def test_vicreg_variance_term_is_zero_above_unit_std_and_positive_when_collapsed():
    """Eq. 1 hinges at ``gamma = 1``; a collapsed dimension has ``std = sqrt(eps) = 0.01``, so a fully
    collapsed pair scores ``(0.99 + 0.99) / 2``, one with half its dimensions collapsed half that."""
    x, y = _pair(5, 256, 8, scale=3.0)
    assert (x.std(0) > 1).all() and (y.std(0) > 1).all()
    assert _variance_only(x, y).item() == 0.0
    collapsed = torch.randn(1, 8, generator=_gen(6), dtype=F64).expand(256, 8).clone()
    torch.testing.assert_close(_variance_only(collapsed, collapsed), torch.tensor(0.99, dtype=F64))
    half = torch.cat([x[:, :4], collapsed[:, 4:]], dim=1)
    torch.testing.assert_close(_variance_only(half, half), torch.tensor(0.99 / 2, dtype=F64))
    shrunk = _variance_only(x * 0.1, y * 0.1)
    assert 0.0 < shrunk.item() < 0.99


def test_vicreg_covariance_term_vanishes_for_uncorrelated_dimensions():
    """Exactly 0 for orthogonal centred columns. For i.i.d. Gaussian dimensions each sample covariance
    ``C_ij`` (i != j) has mean 0 and ``E[C_ij^2] = 1 / (N - 1)`` (Wishart), so ``E[c(Z)] = (D - 1) / (N - 1)``
    per view: 0 in expectation of ``C``, a noise floor that falls as ``1 / N``. Correlated dimensions
    score far above it."""
    z = _orthogonal_columns(7, 40, 6)
    torch.testing.assert_close(_covariance_only(z, z * 2.0), torch.tensor(0.0, dtype=F64), rtol=0, atol=1e-24)
    n, d, draws = 64, 8, 200
    gen = _gen(8)
    samples = torch.randn(draws, 2, n, d, generator=gen, dtype=F64)
    mean = torch.stack([_covariance_only(s[0], s[1]) for s in samples]).mean()
    torch.testing.assert_close(mean, torch.tensor(2 * (d - 1) / (n - 1), dtype=F64), rtol=0.1, atol=0)
    larger = torch.randn(2, 16 * n, d, generator=gen, dtype=F64)
    assert _covariance_only(larger[0], larger[1]) < mean / 4
    correlated = samples[0, 0, :, :1].expand(n, d) + 0.1 * samples[0, 1]
    assert _covariance_only(correlated, correlated) > 10 * mean


def test_vicreg_invariance_term_is_the_mean_squared_difference():
    x, y = _pair(9, 16, 5)
    invariance = vicreg_loss(x, y, sim_coeff=1.0, std_coeff=0.0, cov_coeff=0.0)
    torch.testing.assert_close(invariance, ((x - y) ** 2).mean())
    assert vicreg_loss(x, x.clone(), sim_coeff=1.0, std_coeff=0.0, cov_coeff=0.0).item() == 0.0


# --------------------------------------------------------------------------------------------------------
# Both
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", [barlow_twins_loss, vicreg_loss])
def test_gradients_reach_both_views(loss_fn):
    x, y = _pair(10, 16, 6, scale=0.5)
    x.requires_grad_(True)
    y.requires_grad_(True)
    loss_fn(x, y).backward()
    for grad in (x.grad, y.grad):
        assert grad is not None and torch.isfinite(grad).all()
        assert grad.abs().min(dim=1).values.gt(0).all()  # every row of every view gets a gradient


@pytest.mark.parametrize("loss_fn", [barlow_twins_loss, vicreg_loss])
def test_low_precision_inputs_are_computed_in_fp32(loss_fn):
    x, y = (v.float().bfloat16() for v in _pair(11, 32, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(x, y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_fn(x.float(), y.float()), rtol=1e-6, atol=1e-6)


def test_off_diagonal_and_bad_shapes():
    m = torch.arange(16.0).reshape(4, 4)
    torch.testing.assert_close(off_diagonal(m), _off_diagonal_mask(m))
    assert off_diagonal(torch.ones(1, 1)).numel() == 0
    with pytest.raises(SSLBenchError, match="square"):
        off_diagonal(torch.ones(2, 3))
    with pytest.raises(SSLBenchError, match="same shape"):
        barlow_twins_loss(torch.ones(4, 3), torch.ones(4, 2))
    with pytest.raises(SSLBenchError, match="at least 2 rows"):
        vicreg_loss(torch.ones(1, 3), torch.ones(1, 3))


# --------------------------------------------------------------------------------------------------------
# Two ranks against one process
# --------------------------------------------------------------------------------------------------------


def barlow_on_ranks(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    return barlow_twins_loss(z1, z2, lambda_offdiag=0.05)


def vicreg_on_ranks(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return vicreg_loss(x, y, sim_coeff=2.0, std_coeff=5.0, cov_coeff=1.0)


def test_barlow_twins_on_two_ranks_matches_one_process():
    """Every rank computes the one-process loss; the gradients, averaged as DDP does, are the one-process
    gradients (the backward of the all-reduce sums the upstream gradient over ranks)."""
    z1, z2 = _pair(12, 16, 6, scale=3.0, shift=1.0)
    losses, grads = loss_and_grads_on_ranks(barlow_on_ranks, [z1, z2])
    loss, expected = loss_and_grads_in_one_process(barlow_on_ranks, [z1, z2])
    for rank_loss in losses:
        torch.testing.assert_close(rank_loss, loss, rtol=0, atol=1e-6)
    for got, want in zip(grads, expected, strict=True):
        assert want is not None and want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_vicreg_on_two_ranks_matches_one_process():
    """The mean of the ranks' losses (each has its own invariance term) is the one-process loss, and the
    gradients averaged as DDP does are the one-process gradients."""
    x, y = _pair(13, 16, 6)
    scales = torch.linspace(0.3, 1.5, 6, dtype=F64)  # some dimensions below unit std: the hinge is active
    x, y = x * scales, y * scales
    losses, grads = loss_and_grads_on_ranks(vicreg_on_ranks, [x, y])
    loss, expected = loss_and_grads_in_one_process(vicreg_on_ranks, [x, y])
    assert abs(losses[0] - losses[1]).item() > 1e-6  # the invariance term is each rank's own
    torch.testing.assert_close(torch.stack(losses).mean(), loss, rtol=0, atol=1e-6)
    for got, want in zip(grads, expected, strict=True):
        assert want is not None and want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
