"""Parameter groups, LARS and per-parameter clipping, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sslbench.training.optim import LARS, build_optimizer, parameter_groups
from sslbench.training.step import clip_per_parameter

F64 = torch.float64


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_parameter_groups_split_by_ndim():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.LayerNorm(5),
        nn.Linear(5, 2, bias=False),
    )
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    decay, no_decay = parameter_groups([model, frozen])
    conv, bn, lin, ln, last = model[0], model[1], model[3], model[4], model[5]
    assert _ids(decay["params"]) == _ids([conv.weight, lin.weight, last.weight])
    assert _ids(no_decay["params"]) == _ids([conv.bias, bn.weight, bn.bias, lin.bias, ln.weight, ln.bias])
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert decay["regularized"] is True and "weight_decay" not in decay  # set by the runner's schedule
    assert no_decay["regularized"] is False
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"] is True
    # Frozen parameters are in neither group.
    assert not _ids(frozen.parameters()) & (_ids(decay["params"]) | _ids(no_decay["params"]))


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_build_optimizer_keeps_group_flags(name):
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(name, parameter_groups([model]), momentum=0.9)
    decay, no_decay = optimizer.param_groups
    assert decay["regularized"] and not no_decay["regularized"]
    assert no_decay["weight_decay"] == 0.0
    assert all(group["lr"] == 0.0 for group in optimizer.param_groups)
    if name == "lars":
        assert decay["lars_exclude"] is False and no_decay["lars_exclude"] is True
    if name != "adamw":
        assert decay["momentum"] == no_decay["momentum"] == 0.9


def test_build_optimizer_unknown_name():
    with pytest.raises(ValueError, match="lamb.*adamw, sgd, lars"):
        build_optimizer("lamb", parameter_groups([nn.Linear(2, 2)]), 0.9)


def _norm(values) -> float:
    return math.sqrt(sum(v * v for v in values))


def test_lars_matches_hand_computation():
    lr, wd, momentum, eta = 0.5, 0.1, 0.9, 0.001
    w0 = [1.0, -2.0, 0.5, 2.0]  # a 2x2 weight: adapted, decayed
    b0 = [0.3, -0.4]  # a bias: excluded (plain SGD + momentum, no decay)
    w = nn.Parameter(torch.tensor(w0, dtype=F64).reshape(2, 2))
    b = nn.Parameter(torch.tensor(b0, dtype=F64))
    optimizer = LARS(
        [{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
        lr=lr,
        momentum=momentum,
        eta=eta,
    )
    grads_w = [[0.2, 0.1, -0.3, 0.4], [-0.1, 0.5, 0.2, 0.0]]
    grads_b = [[1.0, 2.0], [-3.0, 0.5]]

    w_ref, b_ref = list(w0), list(b0)
    buf_w, buf_b = [0.0] * 4, [0.0] * 2
    for g_w, g_b in zip(grads_w, grads_b, strict=True):
        w.grad = torch.tensor(g_w, dtype=F64).reshape(2, 2)
        b.grad = torch.tensor(g_b, dtype=F64)
        optimizer.step()
        # Hand computation, element by element.
        update = [g + wd * x for g, x in zip(g_w, w_ref, strict=True)]
        trust = eta * _norm(w_ref) / _norm(update)
        buf_w = [momentum * m + trust * u for m, u in zip(buf_w, update, strict=True)]
        w_ref = [x - lr * m for x, m in zip(w_ref, buf_w, strict=True)]
        buf_b = [momentum * m + g for m, g in zip(buf_b, g_b, strict=True)]
        b_ref = [x - lr * m for x, m in zip(b_ref, buf_b, strict=True)]
        torch.testing.assert_close(w.detach().flatten(), torch.tensor(w_ref, dtype=F64), rtol=0, atol=1e-12)
        torch.testing.assert_close(b.detach(), torch.tensor(b_ref, dtype=F64), rtol=0, atol=1e-12)
    # The trust ratio made the adapted step tiny next to the excluded one.
    assert abs(w_ref[0] - w0[0]) < 1e-2 < abs(b_ref[0] - b0[0])


def test_lars_zero_norm_weight_takes_plain_step():
    # ||w|| == 0: the trust ratio is 1, not 0 (a zero-initialised weight must still learn).
    w = nn.Parameter(torch.zeros(2, 2, dtype=F64))
    optimizer = LARS([w], lr=0.1, weight_decay=0.5, momentum=0.9)
    w.grad = torch.tensor([[1.0, -1.0], [2.0, 0.0]], dtype=F64)
    optimizer.step()
    torch.testing.assert_close(w.detach(), -0.1 * w.grad, rtol=0, atol=1e-15)
    # A parameter without gradient is left alone.
    v = nn.Parameter(torch.ones(3))
    LARS([v], lr=1.0).step()
    assert torch.equal(v.detach(), torch.ones(3))


def test_clip_per_parameter_clips_each_separately():
    big, small, none = (nn.Parameter(torch.zeros(4)) for _ in range(3))
    big.grad = torch.tensor([30.0, 40.0, 0.0, 0.0])  # norm 50
    small.grad = torch.tensor([0.3, 0.0, 0.4, 0.0])  # norm 0.5
    small_before = small.grad.clone()
    clip_per_parameter([big, small, none], max_norm=3.0)
    assert big.grad.norm().item() == pytest.approx(3.0, rel=1e-6)
    torch.testing.assert_close(big.grad, torch.tensor([30.0, 40.0, 0.0, 0.0]) * (3.0 / 50))  # direction kept
    # A global clip (total norm ~50) would have shrunk this one too.
    assert torch.equal(small.grad, small_before)
    assert none.grad is None


def test_clip_per_parameter_zero_grad_stays_zero():
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.zeros(3)
    clip_per_parameter([p], max_norm=1.0)
    assert torch.equal(p.grad, torch.zeros(3))


def test_parameter_rules_without_decay_and_frozen_epochs():
    from sslbench.method.base import ParameterRule, Step

    prototypes, other = nn.Linear(4, 8, bias=False), nn.Linear(4, 4)
    groups = parameter_groups([nn.Sequential(other, prototypes)], [prototypes])
    assert _ids(groups[0]["params"]) == {id(other.weight)}
    assert _ids(groups[1]["params"]) == {id(other.bias), id(prototypes.weight)}
    rule = ParameterRule(prototypes, frozen_epochs=1.5)
    frozen = [rule.frozen_at(Step(i, i // 4, 4, 12)) for i in range(8)]
    assert frozen == [True] * 6 + [False] * 2  # 1.5 epochs of 4 iterations
