"""SwAV's Sinkhorn-Knopp codes and swapped-prediction loss, checked against implementations written here from
the papers' pseudo-code.

- SwAV: Caron et al. 2020 (arXiv 2006.09882), Algorithm 1 (Appendix pseudo-code) and Eq. 1-3, with the
  multi-crop normalisation of the reference loop.
- DINOv2: Oquab et al. 2023 (arXiv 2304.07193), Sinkhorn-Knopp centering of the teacher (epsilon = teacher
  temperature), and its masked-patch variant whose ``B`` is the global count of masked patches.
"""

from __future__ import annotations

import pytest
import torch
from two_ranks import loss_and_grads_in_one_process, loss_and_grads_on_ranks

from sslbench.losses.swapped_prediction import codes_with_queue, sinkhorn_knopp, swav_loss

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = F64, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype)


def _cosine_scores(gen: torch.Generator, batch: int, prototypes: int) -> torch.Tensor:
    """Scores as SwAV computes them: normalised embeddings against normalised prototypes, in [-1, 1]."""
    z = torch.nn.functional.normalize(_randn(gen, batch, 16), dim=1)
    c = torch.nn.functional.normalize(_randn(gen, prototypes, 16), dim=1)
    return z @ c.t()


def _paper_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """The SwAV paper's pseudo-code (Appendix), one process, verbatim up to naming."""
    Q = torch.exp(scores / eps).T
    Q = Q / torch.sum(Q)
    K, B = Q.shape
    for _ in range(iters):
        Q = Q / torch.sum(Q, dim=1, keepdim=True)
        Q = Q / K
        Q = Q / torch.sum(Q, dim=0, keepdim=True)
        Q = Q / B
    return (Q * B).T


def _dinov2_sinkhorn_teacher(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3):
    """DINOv2's ``sinkhorn_knopp_teacher`` (one process): the same algorithm on the logits, in fp32."""
    teacher_output = teacher_output.float()
    Q = torch.exp(teacher_output / teacher_temp).t()
    B, K = Q.shape[1], Q.shape[0]
    Q = Q / Q.sum()
    for _ in range(n_iterations):
        Q = Q / Q.sum(dim=1, keepdim=True) / K
        Q = Q / Q.sum(dim=0, keepdim=True) / B
    return (Q * B).t()


# --------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "prototypes"), [(8, 5), (32, 10), (7, 64), (100, 3), (1, 4)])
@pytest.mark.parametrize(("eps", "iters"), [(0.05, 3), (0.1, 1), (0.03, 10)])
def test_sinkhorn_matches_paper_pseudo_code(batch: int, prototypes: int, eps: float, iters: int) -> None:
    scores = _cosine_scores(_gen(batch * 1000 + prototypes), batch, prototypes)
    codes = sinkhorn_knopp(scores, eps, iters)
    assert codes.shape == (batch, prototypes) and codes.dtype == F64
    torch.testing.assert_close(codes, _paper_sinkhorn(scores, eps, iters), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(batch, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("batch", "prototypes"), [(12, 4), (30, 6), (64, 16)])
def test_sinkhorn_marginals_converge(batch: int, prototypes: int) -> None:
    """Enough iterations reach the transportation polytope (Eq. 4): each sample's code sums to 1 and
    each prototype receives ``B / K`` samples' worth of mass, however unequal the scores."""
    gen = _gen(7 + batch)
    scores = _cosine_scores(gen, batch, prototypes) + torch.linspace(0, 1, prototypes, dtype=F64)
    codes = sinkhorn_knopp(scores, 0.1, iterations=500)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(batch, dtype=F64), rtol=0, atol=1e-12)
    expected = torch.full((prototypes,), batch / prototypes, dtype=F64)
    torch.testing.assert_close(codes.sum(dim=0), expected, rtol=0, atol=1e-6)
    assert (codes > 0).all()
    # three iterations (the paper's) already move the prototype masses far towards B / K
    raw = torch.softmax(scores / 0.1, dim=1).sum(dim=0)
    three = sinkhorn_knopp(scores, 0.1, iterations=3).sum(dim=0)
    assert (three - expected).abs().max() < 0.2 * (raw - expected).abs().max()


@pytest.mark.parametrize("teacher_temp", [0.04, 0.07])
def test_sinkhorn_with_teacher_temperature_is_dinov2_centering(teacher_temp: float) -> None:
    gen = _gen(11)
    logits = _cosine_scores(gen, 24, 32).float()
    codes = sinkhorn_knopp(logits, teacher_temp)
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes, _dinov2_sinkhorn_teacher(logits, teacher_temp), rtol=1e-5, atol=1e-7)
    # bf16 logits are promoted: the same codes as from their fp32 values
    low = logits.bfloat16()
    torch.testing.assert_close(sinkhorn_knopp(low, teacher_temp), sinkhorn_knopp(low.float(), teacher_temp))
    assert sinkhorn_knopp(low, teacher_temp).dtype == torch.float32


def test_sinkhorn_large_logits_do_not_overflow() -> None:
    """Logits / 0.04 past fp32's exp range (an unnormalised head): the fp32 transcription overflows to NaN,
    the codes equal the fp64 pseudo-code's."""
    logits = (_cosine_scores(_gen(5), 16, 8) + 5.0).float()
    assert not torch.isfinite(_dinov2_sinkhorn_teacher(logits, 0.04)).all()
    codes = sinkhorn_knopp(logits, 0.04)
    assert codes.dtype == torch.float32
    torch.testing.assert_close(
        codes.double(), _paper_sinkhorn(logits.double(), 0.04, 3), rtol=1e-4, atol=1e-6
    )


def test_sinkhorn_valid_rows_are_the_masked_variant() -> None:
    """DINOv2's masked patches: only valid rows are partitioned (B = their count); the others get zeros."""
    gen = _gen(13)
    scores = _randn(gen, 20, 6)
    valid = torch.rand(20, generator=gen) < 0.6
    codes = sinkhorn_knopp(scores, 0.5, 3, valid=valid)
    torch.testing.assert_close(codes[valid], _paper_sinkhorn(scores[valid], 0.5, 3), rtol=1e-10, atol=1e-12)
    assert (codes[~valid] == 0).all()
    all_valid = sinkhorn_knopp(scores, 0.5, 3, valid=torch.ones(20, dtype=torch.bool))
    torch.testing.assert_close(all_valid, sinkhorn_knopp(scores, 0.5, 3), rtol=1e-12, atol=1e-14)
    assert (sinkhorn_knopp(scores, 0.5, 3, valid=torch.zeros(20, dtype=torch.bool)) == 0).all()


def test_sinkhorn_has_no_gradient_and_refuses_bad_arguments() -> None:
    scores = _randn(_gen(3), 6, 4).requires_grad_(True)
    codes = sinkhorn_knopp(scores, 0.05)
    assert not codes.requires_grad
    assert scores.grad is None
    with pytest.raises(ValueError, match="iteration"):
        sinkhorn_knopp(scores, 0.05, iterations=0)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(scores, 0.0)


# --------------------------------------------------------------------------------------------------------
# Queue
# --------------------------------------------------------------------------------------------------------


def test_codes_with_queue_are_the_last_rows_of_the_joint_sinkhorn() -> None:
    gen = _gen(17)
    scores, queue = _cosine_scores(gen, 8, 10), _cosine_scores(gen, 24, 10)
    codes = codes_with_queue(scores, queue, 0.05, 3)
    joint = _paper_sinkhorn(torch.cat([queue, scores]), 0.05, 3)
    torch.testing.assert_close(codes, joint[-8:], rtol=1e-10, atol=1e-12)
    # the queue changes the codes, and without one they are the batch's own
    assert not torch.allclose(codes, sinkhorn_knopp(scores, 0.05, 3))
    torch.testing.assert_close(codes_with_queue(scores, None, 0.05, 3), sinkhorn_knopp(scores, 0.05, 3))
    assert codes_with_queue(scores[:0], queue, 0.05, 3).shape == (0, 10)


# --------------------------------------------------------------------------------------------------------
# Swapped prediction loss
# --------------------------------------------------------------------------------------------------------


def _paper_swav_loss(scores: list[torch.Tensor], codes: list[torch.Tensor], tau: float) -> torch.Tensor:
    """Eq. 1-2 per sample, with the reference's multi-crop normalisation: for each assigned crop i, the
    mean over samples of -sum_k q_i log p_v, summed over v != i and divided by (V - 1); mean over i."""
    n_crops, batch = len(scores), scores[0].shape[0]
    total = torch.zeros((), dtype=F64)
    for i, q in enumerate(codes):
        subloss = torch.zeros((), dtype=F64)
        for v in range(n_crops):
            if v == i:
                continue
            for b in range(batch):
                e = torch.exp(scores[v][b] / tau)
                p = e / e.sum()
                subloss = subloss - (q[b].detach() * torch.log(p)).sum() / batch
        total = total + subloss / (n_crops - 1)
    return total / len(codes)


def _swav_inputs(seed: int, n_crops: int, n_codes: int, batch: int = 6, prototypes: int = 9):
    gen = _gen(seed)
    scores = [_cosine_scores(gen, batch, prototypes).requires_grad_(True) for _ in range(n_crops)]
    codes = [sinkhorn_knopp(s, 0.05, 3).requires_grad_(True) for s in scores[:n_codes]]
    return scores, codes


@pytest.mark.parametrize(("n_crops", "n_codes"), [(2, 2), (5, 2), (4, 1), (3, 3)])
def test_swav_loss_matches_paper(n_crops: int, n_codes: int) -> None:
    scores, codes = _swav_inputs(n_crops * 10 + n_codes, n_crops, n_codes)
    loss = swav_loss(scores, codes, 0.1)
    expected = _paper_swav_loss(scores, codes, 0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(loss, scores, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, scores, allow_unused=True)
    for v, (got, want) in enumerate(zip(grads, expected_grads, strict=True)):
        if n_codes == 1 and v == 0:  # the only assigned crop is never a prediction: no gradient
            assert got is None and want is None
            continue
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert got.abs().sum() > 0


def test_swav_loss_gradient_reaches_scores_only() -> None:
    scores, codes = _swav_inputs(23, 5, 2)
    swav_loss(scores, codes, 0.1).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scores)
    assert all(c.grad is None for c in codes)


def test_swav_loss_in_fp32_and_refuses_bad_crops() -> None:
    scores, codes = _swav_inputs(29, 3, 2)
    low = [s.detach().bfloat16() for s in scores]
    assert swav_loss(low, codes, 0.1).dtype == F64  # promoted with the fp64 codes, never bf16
    assert swav_loss(low, [c.float() for c in codes], 0.1).dtype == torch.float32
    with pytest.raises(ValueError, match="2 crops"):
        swav_loss(scores[:1], codes[:1], 0.1)
    with pytest.raises(ValueError, match="codes"):
        swav_loss(scores[:2], codes + codes, 0.1)


# --------------------------------------------------------------------------------------------------------
# Two ranks
# --------------------------------------------------------------------------------------------------------


def swav_step_with_queue(
    g0: torch.Tensor,
    g1: torch.Tensor,
    l0: torch.Tensor,
    queue0: torch.Tensor,
    queue1: torch.Tensor,
    probe: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """SwAV's step (codes of the 2 global crops with each rank's queue, the loss over 3 crops), plus two
    probes whose gradients are codes: ``probe``'s first column block is the codes of crop 0, its second
    the masked-variant codes of crop 1 (a different count of valid rows on each rank)."""
    codes = [codes_with_queue(g0, queue0, 0.05, 3), codes_with_queue(g1, queue1, 0.05, 3)]
    masked = sinkhorn_knopp(g1, 0.05, 3, valid=valid)
    loss = swav_loss([g0, g1, l0], codes, 0.1)
    return loss + (probe * torch.cat([codes[0], masked], dim=1)).sum()


def test_two_ranks_match_one_process() -> None:
    gen = _gen(31)
    batch, prototypes = 8, 7
    g0, g1, l0 = (_cosine_scores(gen, batch, prototypes) for _ in range(3))
    queue0, queue1 = _cosine_scores(gen, 12, prototypes), _cosine_scores(gen, 12, prototypes)
    probe = torch.zeros(batch, 2 * prototypes, dtype=F64)
    valid = torch.tensor([1, 0, 0, 1, 1, 1, 1, 0], dtype=torch.bool)  # 2 valid rows on rank 0, 3 on rank 1
    inputs = [g0, g1, l0, queue0, queue1, probe, valid]
    losses, grads = loss_and_grads_on_ranks(swav_step_with_queue, inputs)
    loss, one_grads = loss_and_grads_in_one_process(swav_step_with_queue, inputs)
    torch.testing.assert_close(torch.stack(losses).mean(), loss, rtol=0, atol=1e-6)
    # probe: each rank's gradient is its rows of the codes (halved by the averaging), one process's all
    torch.testing.assert_close(grads[5] * 2, one_grads[5], rtol=0, atol=1e-6)
    for got, want in zip(grads[:3], one_grads[:3], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    codes0, masked = one_grads[5][:, :prototypes], one_grads[5][:, prototypes:]
    torch.testing.assert_close(codes0, _paper_sinkhorn(torch.cat([queue0, g0]), 0.05, 3)[-batch:])
    torch.testing.assert_close(masked[valid], _paper_sinkhorn(g1[valid], 0.05, 3))
    assert (masked[~valid] == 0).all()
