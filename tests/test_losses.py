"""The loss functions checked against independent implementations written from the papers' pseudo-code.

- DINO: Caron et al. 2021 (arXiv 2104.14294), Algorithm 1, with the multi-crop pairing of the reference code.
- BYOL: Grill et al. 2020 (arXiv 2006.07733), Eq. 2.
- SimCLR: Chen et al. 2020 (arXiv 2002.05709), Algorithm 1.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslbench.losses import byol_loss, dino_loss, nt_xent_loss, updated_center

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = F64, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype) * scale


# --------------------------------------------------------------------------------------------------------
# DINO
# --------------------------------------------------------------------------------------------------------


def _softmax_rows(x: torch.Tensor, temp: float) -> torch.Tensor:
    """Row-wise softmax written out: exp(x / temp - max) / sum exp(x / temp - max)."""
    y = x / temp
    y = y - y.max(dim=1, keepdim=True).values
    e = torch.exp(y)
    return e / e.sum(dim=1, keepdim=True)


def _paper_H(t: torch.Tensor, s: torch.Tensor, center: torch.Tensor, tps: float, tpt: float) -> torch.Tensor:
    """``H`` of Algorithm 1 in the DINO paper, verbatim up to naming."""
    t = t.detach()
    s = _softmax_rows(s, tps)
    t = _softmax_rows(t - center, tpt)
    return -(t * torch.log(s)).sum(dim=1).mean()


def _reference_dino(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    center: torch.Tensor,
    tps: float,
    tpt: float,
) -> torch.Tensor:
    """Multi-crop DINO loss built as an explicit list of (teacher view, student view) pairs, per sample.

    The teacher sees the global views (indices 0 and 1), the student every view; each teacher global view
    is paired with every student view except the same view, and the loss is the mean over those pairs of
    the batch-averaged cross-entropy.
    """
    pairs = [(i, j) for i in range(len(teacher)) for j in range(len(student)) if i != j]
    batch = student[0].shape[0]
    total = torch.zeros((), dtype=student[0].dtype)
    for i, j in pairs:
        per_sample = []
        for b in range(batch):
            t_row = teacher[i][b : b + 1].detach()
            s_row = student[j][b : b + 1]
            p_t = _softmax_rows(t_row - center.reshape(1, -1), tpt)[0]
            log_p_s = torch.log(_softmax_rows(s_row, tps))[0]
            per_sample.append(-(p_t * log_p_s).sum())
        total = total + torch.stack(per_sample).sum() / batch
    return total / len(pairs)


def _dino_inputs(seed: int, n_crops: int, batch: int = 4, dim: int = 11):
    gen = _gen(seed)
    student = [_randn(gen, batch, dim, scale=3.0).requires_grad_(True) for _ in range(n_crops)]
    teacher = [_randn(gen, batch, dim, scale=3.0).requires_grad_(True) for _ in range(2)]
    center = _randn(gen, 1, dim, scale=0.5)
    return student, teacher, center


def test_dino_two_crops_equals_algorithm_1():
    tps, tpt = 0.1, 0.04
    student, teacher, center = _dino_inputs(0, n_crops=2)
    s1, s2 = student
    t1, t2 = teacher
    expected = (_paper_H(t1, s2, center, tps, tpt) + _paper_H(t2, s1, center, tps, tpt)) / 2
    got = dino_loss(student, teacher, center, tps, tpt)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        got, _reference_dino(student, teacher, center, tps, tpt), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize(("tps", "tpt"), [(0.1, 0.04), (0.5, 0.2)])
def test_dino_multi_crop_matches_reference(tps: float, tpt: float):
    student, teacher, center = _dino_inputs(1, n_crops=2 + 6)
    got = dino_loss(student, teacher, center, tps, tpt)
    expected = _reference_dino(student, teacher, center, tps, tpt)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)

    # 2 * 8 - 2 = 14 pairs; the same value from Algorithm 1's H summed over those pairs.
    pair_sum = sum(
        _paper_H(teacher[i], student[j], center, tps, tpt) for i in range(2) for j in range(8) if i != j
    )
    torch.testing.assert_close(got, pair_sum / 14, rtol=1e-10, atol=1e-10)


def test_dino_center_is_used():
    tps, tpt = 0.1, 0.04
    student, teacher, center = _dino_inputs(2, n_crops=4)
    with_center = dino_loss(student, teacher, center, tps, tpt)
    without = dino_loss(student, teacher, torch.zeros_like(center), tps, tpt)
    assert not torch.allclose(with_center, without)
    torch.testing.assert_close(
        without, _reference_dino(student, teacher, torch.zeros_like(center), tps, tpt), rtol=1e-10, atol=1e-10
    )


def test_dino_gradients_flow_to_student_only():
    tps, tpt = 0.1, 0.04
    student, teacher, center = _dino_inputs(3, n_crops=2 + 6)
    dino_loss(student, teacher, center, tps, tpt).backward()
    assert all(t.grad is None for t in teacher)
    got_grads = [s.grad.clone() for s in student]
    assert all(g.abs().sum() > 0 for g in got_grads)

    for s in student:
        s.grad = None
    _reference_dino(student, teacher, center, tps, tpt).backward()
    assert all(t.grad is None for t in teacher)
    for got, s in zip(got_grads, student, strict=True):
        torch.testing.assert_close(got, s.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.9, 0.996, 0.0])
def test_dino_center_update_algorithm_1(momentum: float):
    gen = _gen(4)
    batch, dim = 6, 9
    center = torch.randn(1, dim, generator=gen)
    t1 = torch.randn(batch, dim, generator=gen) * 2 + 1
    t2 = torch.randn(batch, dim, generator=gen) * 2 - 1
    got = updated_center(center, [t1, t2], momentum)

    # C = m*C + (1-m)*cat([t1, t2]).mean(dim=0), with the mean written out as a loop over samples.
    rows = [t1[b] for b in range(batch)] + [t2[b] for b in range(batch)]
    mean = sum(r.double() for r in rows) / len(rows)
    expected = momentum * center.double() + (1 - momentum) * mean.reshape(1, -1)
    assert got.shape == center.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_dino_center_update_carries_no_gradient():
    gen = _gen(5)
    teacher = [torch.randn(4, 7, generator=gen, requires_grad=True) for _ in range(2)]
    new = updated_center(torch.zeros(1, 7), teacher, 0.9)
    assert not new.requires_grad


def test_dino_uniform_outputs_give_log_k():
    batch, dim = 4, 13
    # Constant rows are uniform after softmax, whatever the temperatures or a constant center.
    student = [torch.full((batch, dim), 0.3, dtype=F64) for _ in range(2 + 4)]
    teacher = [torch.full((batch, dim), -1.2, dtype=F64) for _ in range(2)]
    center = torch.full((1, dim), 0.7, dtype=F64)
    got = dino_loss(student, teacher, center, 0.1, 0.04)
    torch.testing.assert_close(got, torch.tensor(math.log(dim), dtype=F64), rtol=1e-12, atol=1e-12)


def test_dino_matching_confident_outputs_beat_mismatched():
    gen = _gen(6)
    batch, dim, n_crops = 8, 10, 2 + 4
    labels = torch.randint(0, dim, (batch,), generator=gen)
    confident = torch.nn.functional.one_hot(labels, dim).to(F64) * 5.0
    other = torch.nn.functional.one_hot((labels + 1) % dim, dim).to(F64) * 5.0
    center = torch.zeros(1, dim, dtype=F64)
    teacher = [confident.clone() for _ in range(2)]
    matched = dino_loss([confident.clone() for _ in range(n_crops)], teacher, center, 0.1, 0.04)
    mismatched = dino_loss([other.clone() for _ in range(n_crops)], teacher, center, 0.1, 0.04)
    assert matched < 0.01
    assert mismatched > 10 * matched + 1.0


# --------------------------------------------------------------------------------------------------------
# BYOL
# --------------------------------------------------------------------------------------------------------


def _reference_byol(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Eq. 2: ``|| q / ||q|| - z / ||z|| ||_2^2``, averaged over the batch; the target is a constant."""
    z = z.detach()
    q_bar = q / torch.sqrt((q * q).sum(dim=1, keepdim=True))
    z_bar = z / torch.sqrt((z * z).sum(dim=1, keepdim=True))
    diff = q_bar - z_bar
    return (diff * diff).sum(dim=1).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_byol_matches_eq_2(seed: int):
    gen = _gen(10 + seed)
    q = _randn(gen, 7, 16, scale=2.5).requires_grad_(True)
    z = _randn(gen, 7, 16, scale=0.3).requires_grad_(True)
    got = byol_loss(q, z)
    expected = _reference_byol(q, z)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)

    got.backward()
    assert z.grad is None
    got_grad = q.grad.clone()
    assert got_grad.abs().sum() > 0
    q.grad = None
    expected.backward()
    torch.testing.assert_close(got_grad, q.grad, rtol=1e-9, atol=1e-12)


def test_byol_extremes():
    gen = _gen(13)
    q = _randn(gen, 5, 8)
    torch.testing.assert_close(byol_loss(q, 3.0 * q), torch.tensor(0.0, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(byol_loss(q, -q), torch.tensor(4.0, dtype=F64), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------------------
# SimCLR
# --------------------------------------------------------------------------------------------------------


def _reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Algorithm 1 of the SimCLR paper with explicit loops, over the paper's interleaved order.

    The paper indexes the 2N augmented examples so that (2k-1, 2k) is a positive pair (1-based); here
    (2k, 2k+1), 0-based, with z[2k] = z1[k] and z[2k+1] = z2[k].
    """
    n = z1.shape[0]
    z = []
    for k in range(n):
        z.extend([z1[k], z2[k]])
    m = 2 * n
    s = [
        [torch.dot(z[i], z[j]) / (torch.linalg.norm(z[i]) * torch.linalg.norm(z[j])) for j in range(m)]
        for i in range(m)
    ]

    def ell(i: int, j: int) -> torch.Tensor:
        denom = sum(torch.exp(s[i][k] / tau) for k in range(m) if k != i)
        return -torch.log(torch.exp(s[i][j] / tau) / denom)

    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n)) / m


def _reference_code_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """The reference code's ``add_contrastive_loss`` (google-research/simclr), transcribed: masked
    self-similarities at -1e9, softmax cross-entropy averaged over the batch, ``loss_a + loss_b``."""
    h1, h2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = h1.shape[0]
    masks = torch.eye(n, dtype=h1.dtype) * 1e9
    logits_aa, logits_bb = h1 @ h1.t() / tau - masks, h2 @ h2.t() / tau - masks
    logits_ab, logits_ba = h1 @ h2.t() / tau, h2 @ h1.t() / tau
    labels = torch.arange(n)
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)
    return loss_a + loss_b


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_the_reference_code_and_twice_algorithm_1(tau: float):
    gen = _gen(20)
    z1 = _randn(gen, 6, 10, scale=2.0).requires_grad_(True)
    z2 = _randn(gen, 6, 10, scale=0.5).requires_grad_(True)
    got = nt_xent_loss(z1, z2, tau)
    torch.testing.assert_close(got, _reference_code_nt_xent(z1, z2, tau), rtol=1e-10, atol=1e-10)
    expected = 2 * _reference_nt_xent(z1, z2, tau)  # the paper's average over 2N anchors, doubled
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)

    got.backward()
    got_grads = (z1.grad.clone(), z2.grad.clone())
    z1.grad = z2.grad = None
    expected.backward()
    torch.testing.assert_close(got_grads[0], z1.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(got_grads[1], z2.grad, rtol=1e-8, atol=1e-10)


def test_nt_xent_is_symmetric_in_views():
    gen = _gen(21)
    z1, z2 = _randn(gen, 5, 8), _randn(gen, 5, 8)
    torch.testing.assert_close(nt_xent_loss(z1, z2, 0.2), nt_xent_loss(z2, z1, 0.2), rtol=1e-12, atol=1e-12)


def test_nt_xent_aligned_pairs_beat_random_pairs():
    gen = _gen(22)
    z1 = _randn(gen, 16, 32)
    aligned = nt_xent_loss(z1, z1 + 0.01 * _randn(gen, 16, 32), 0.1)
    random_pairs = nt_xent_loss(z1, _randn(gen, 16, 32), 0.1)
    assert aligned < random_pairs
    # Random pairs: roughly ln(2N - 1) or worse; aligned: far below it.
    assert aligned < 0.5 * math.log(2 * 16 - 1)
