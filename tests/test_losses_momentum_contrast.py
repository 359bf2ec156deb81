"""The momentum-contrast losses checked against independent implementations written from the papers'
pseudo-code, and across 2 ranks.

- MoCo v1/v2: He et al. 2020 (arXiv 1911.05722), Algorithm 1 (bmm / mm logits, queue of C x K).
- MoCo v3: Chen, Xie & He 2021 (arXiv 2104.02057), Algorithm 1 (``ctr``: ``2 * tau * CE``).
- The queue update, against a ring buffer written one key at a time.
"""

from __future__ import annotations

import pytest
import torch
from two_ranks import loss_and_grads_in_one_process, loss_and_grads_on_ranks

from sslbench.losses.momentum_contrast import enqueue, info_nce_with_queue, moco_v3_loss

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64) * scale


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=1, keepdim=True))


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-log(exp(l_y) / sum_j exp(l_j))`` averaged over rows, written out."""
    e = torch.exp(logits)
    picked = e[torch.arange(logits.shape[0]), labels]
    return -torch.log(picked / e.sum(dim=1)).mean()


def _algorithm_1_moco(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> torch.Tensor:
    """MoCo Algorithm 1, up to naming; the paper's queue is C x K, ours K x C."""
    n, c = q.shape
    size = queue.shape[0]
    q, k = _unit(q), _unit(k).detach()
    l_pos = torch.bmm(q.view(n, 1, c), k.view(n, c, 1)).view(n, 1)
    l_neg = torch.mm(q.view(n, c), queue.t().contiguous().view(c, size))
    logits = torch.cat([l_pos, l_neg], dim=1)
    labels = torch.zeros(n, dtype=torch.long)  # positives are the 0-th
    return _cross_entropy(logits / t, labels)


def _algorithm_1_moco_v3_rows(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo v3 Algorithm 1's ``ctr`` per query row (before the mean), ``2 * tau`` included."""
    q, k = _unit(q), _unit(k).detach()
    logits = torch.mm(q, k.t()) / tau  # [N, N] pairs, positives on the diagonal
    e = torch.exp(logits)
    return -2 * tau * torch.log(torch.diagonal(e) / e.sum(dim=1))


def _algorithm_1_moco_v3(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    return _algorithm_1_moco_v3_rows(q, k, tau).mean()


# --------------------------------------------------------------------------------------------------------
# MoCo v1/v2: InfoNCE against a queue
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "c", "size", "t"), [(4, 8, 16, 0.07), (7, 5, 3, 0.2), (1, 16, 33, 1.0)])
def test_info_nce_matches_algorithm_1(n: int, c: int, size: int, t: float):
    gen = _gen(n + c + size)
    q = _randn(gen, n, c, scale=3.0).requires_grad_(True)
    k = _randn(gen, n, c, scale=0.5)
    queue = _unit(_randn(gen, size, c))
    got = info_nce_with_queue(q, k, queue, t)
    expected = _algorithm_1_moco(q, k, queue, t)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    (got_grad,) = torch.autograd.grad(got, q)
    (expected_grad,) = torch.autograd.grad(expected, q)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_info_nce_gradient_flows_to_query_only():
    gen = _gen(1)
    q, k = _randn(gen, 5, 6).requires_grad_(True), _randn(gen, 5, 6).requires_grad_(True)
    queue = _unit(_randn(gen, 9, 6)).requires_grad_(True)
    info_nce_with_queue(q, k, queue, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None
    assert queue.grad is None


def test_info_nce_normalises_queries_and_keys():
    gen = _gen(2)
    q, k, queue = _randn(gen, 5, 6), _randn(gen, 5, 6), _unit(_randn(gen, 9, 6))
    scales = torch.rand(5, 1, generator=gen, dtype=F64) * 10 + 0.1
    torch.testing.assert_close(
        info_nce_with_queue(q * scales, k / scales, queue, 0.2),
        info_nce_with_queue(q, k, queue, 0.2),
        rtol=1e-12,
        atol=1e-12,
    )


def test_info_nce_matching_keys_beat_random_keys():
    gen = _gen(3)
    q, queue = _randn(gen, 16, 32), _unit(_randn(gen, 64, 32))
    matching = info_nce_with_queue(q, q + 0.01 * _randn(gen, 16, 32), queue, 0.07)
    random_keys = info_nce_with_queue(q, _randn(gen, 16, 32), queue, 0.07)
    assert matching < 0.1 < random_keys


# --------------------------------------------------------------------------------------------------------
# MoCo v3
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "c", "tau"), [(4, 8, 0.2), (9, 3, 1.0), (1, 5, 0.1)])
def test_moco_v3_matches_algorithm_1(n: int, c: int, tau: float):
    gen = _gen(10 + n + c)
    q = _randn(gen, n, c, scale=2.0).requires_grad_(True)
    k = _randn(gen, n, c, scale=0.3)
    got = moco_v3_loss(q, k, tau)
    expected = _algorithm_1_moco_v3(q, k, tau)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    (got_grad,) = torch.autograd.grad(got, q)
    (expected_grad,) = torch.autograd.grad(expected, q)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_moco_v3_gradient_flows_to_query_only():
    gen = _gen(11)
    q, k = _randn(gen, 5, 6).requires_grad_(True), _randn(gen, 5, 6).requires_grad_(True)
    moco_v3_loss(q, k, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None


# --------------------------------------------------------------------------------------------------------
# Precision: at least fp32, autocast off
# --------------------------------------------------------------------------------------------------------


def test_losses_run_in_fp32_under_bf16_autocast():
    gen = _gen(12)
    q, k = _randn(gen, 8, 16).float(), _randn(gen, 8, 16).float()
    queue = _unit(_randn(gen, 24, 16)).float()
    plain = (info_nce_with_queue(q, k, queue, 0.07), moco_v3_loss(q, k, 0.2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = (info_nce_with_queue(q, k, queue, 0.07), moco_v3_loss(q, k, 0.2))
    for a, b in zip(plain, mixed, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert info_nce_with_queue(q.bfloat16(), k.bfloat16(), queue, 0.07).dtype == torch.float32
    assert moco_v3_loss(q.bfloat16(), k.bfloat16(), 0.2).dtype == torch.float32


# --------------------------------------------------------------------------------------------------------
# The queue
# --------------------------------------------------------------------------------------------------------


def _ring_buffer(queue: torch.Tensor, pointer: int, keys: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One key at a time: the oldest entry (at the pointer) is replaced, the pointer moves on by one."""
    queue = queue.clone()
    for key in _unit(keys):
        queue[pointer] = key
        pointer = (pointer + 1) % queue.shape[0]
    return queue, pointer


def test_enqueue_writes_keys_in_order_at_the_pointer():
    gen = _gen(20)
    queue, keys = _unit(_randn(gen, 8, 4)), _randn(gen, 3, 4, scale=5.0)
    before, pointer = queue.clone(), torch.tensor([2])
    enqueue(queue, pointer, keys)
    torch.testing.assert_close(queue[2:5], _unit(keys), rtol=0, atol=1e-15)
    torch.testing.assert_close(queue[:2], before[:2], rtol=0, atol=0)
    torch.testing.assert_close(queue[5:], before[5:], rtol=0, atol=0)
    assert pointer.dtype == torch.int64 and pointer.tolist() == [5]


@pytest.mark.parametrize(("size", "batch", "start"), [(5, 3, 0), (7, 2, 6), (3, 7, 1), (4, 4, 2)])
def test_enqueue_wraps_around_like_a_ring_buffer(size: int, batch: int, start: int):
    """Queue sizes the batch does not divide, and a batch larger than the queue, over several steps."""
    gen = _gen(21 + size + batch)
    queue = _unit(_randn(gen, size, 6)).float()
    pointer = torch.tensor([start], dtype=torch.int64)
    expected, expected_pointer = queue.double(), start
    for _ in range(4):
        keys = _randn(gen, batch, 6, scale=3.0)
        enqueue(queue, pointer, keys)
        expected, expected_pointer = _ring_buffer(expected, expected_pointer, keys)
        torch.testing.assert_close(queue, expected.float(), rtol=0, atol=1e-7)
        assert pointer.tolist() == [expected_pointer]
        torch.testing.assert_close(queue.norm(dim=1), torch.ones(size), rtol=0, atol=1e-6)


def test_enqueue_carries_no_gradient():
    gen = _gen(22)
    queue, pointer = _unit(_randn(gen, 6, 4)), torch.zeros(1, dtype=torch.int64)
    keys = _randn(gen, 4, 4).requires_grad_(True)
    enqueue(queue, pointer, keys)
    assert not queue.requires_grad and queue.grad_fn is None


# --------------------------------------------------------------------------------------------------------
# 2 ranks (gloo, CPU): spawns 2 processes, ~10 s; one run checks both collectives
# --------------------------------------------------------------------------------------------------------

QUEUE_SIZE, QUEUE_START = 11, 7  # the global batch of 8 keys wraps around the end: rows 7-10, then 0-3


def _initial_queue(dim: int) -> torch.Tensor:
    return _unit(_randn(_gen(30), QUEUE_SIZE, dim))


def _queue_checksum(queue: torch.Tensor, pointer: torch.Tensor | int) -> torch.Tensor:
    """A position-weighted sum of the queue, plus the pointer: equal only for the same rows in the same
    places (up to a coincidence of measure zero)."""
    weights = torch.arange(1, queue.numel() + 1, dtype=F64).view_as(queue)
    return (queue * weights).sum() + torch.as_tensor(pointer, dtype=F64).sum()


def _moco_v3_and_queue_on_rank(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """MoCo v3's loss, plus the checksum of a queue the keys of every rank were just written into."""
    queue, pointer = _initial_queue(k.shape[1]), torch.tensor([QUEUE_START], dtype=torch.int64)
    enqueue(queue, pointer, k)
    return moco_v3_loss(q, k, 0.2) + _queue_checksum(queue, pointer)


def test_two_ranks_moco_v3_and_queue_equal_one_process():
    """Each rank scores only its own queries against every rank's keys (positives offset by rank * N),
    and every rank's queue receives every rank's keys in rank order. So each rank's loss is the mean over
    its rows of Algorithm 1 plus the checksum of the one-process queue, the mean of the ranks' losses is
    the one-process loss, and DDP's averaged gradients are its gradients."""
    gen = _gen(31)
    q, k = _randn(gen, 8, 6, scale=2.0), _randn(gen, 8, 6)
    losses, grads = loss_and_grads_on_ranks(_moco_v3_and_queue_on_rank, [q, k])
    loss, one_grads = loss_and_grads_in_one_process(_moco_v3_and_queue_on_rank, [q, k])

    rows = _algorithm_1_moco_v3_rows(q, k, 0.2)
    checksum = _queue_checksum(*_ring_buffer(_initial_queue(6), QUEUE_START, k))
    for r, rank_loss in enumerate(losses):
        expected = rows[4 * r : 4 * (r + 1)].mean() + checksum
        torch.testing.assert_close(rank_loss, expected, rtol=1e-10, atol=1e-10)
    assert abs(losses[0] - losses[1]) > 1e-3  # the ranks' queries differ: not the same loss twice
    torch.testing.assert_close(torch.stack(losses).mean(), loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], one_grads[0], rtol=1e-6, atol=1e-10)
    assert grads[0].abs().sum() > 0
    assert grads[1] is None and one_grads[1] is None
