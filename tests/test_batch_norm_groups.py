"""Grouped BatchNorm, MoCo v2's shuffling BN: each group normalised on its own, and a query never shares
more than 1/G of its statistics with its positive key (2 ranks against 1 process: tests/test_distributed.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sslbench_methods.mocov2 import MoCoV2
from torch import nn

from sslbench import Step, TrainContext, create_backbone
from sslbench.models.batch_norm_groups import (
    GroupedBatchNorm,
    batch_norm_groups,
    contiguous_groups,
    strided_groups,
    use_grouped_batch_norm,
)


def _layers(channels: int = 5) -> tuple[nn.BatchNorm2d, GroupedBatchNorm]:
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(channels)
    nn.init.normal_(plain.weight)
    nn.init.normal_(plain.bias)
    grouped = use_grouped_batch_norm(nn.Sequential(copy.deepcopy(plain)))[0]
    assert isinstance(grouped, GroupedBatchNorm)
    return plain, grouped


def test_each_group_is_normalised_with_its_own_statistics():
    plain, grouped = _layers()
    x = torch.randn(12, 5, 3, 3, generator=torch.Generator().manual_seed(1)) * 3 + 1
    rows = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2, 2, 0, 1])
    x_grouped = x.clone().requires_grad_()
    with batch_norm_groups(grouped, rows, 3):
        out = grouped(x_grouped)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()

    # Independent: each group's rows normalised alone, as one GPU's BatchNorm in the reference
    expected = torch.empty_like(out)
    x_plain = x.clone().requires_grad_()
    running_means, running_vars = [], []
    for group in range(3):
        index = (rows == group).nonzero().squeeze(1)
        mean, var = plain.running_mean.clone(), plain.running_var.clone()
        expected[index] = F.batch_norm(x_plain[index], mean, var, plain.weight, plain.bias, True, 0.1, 1e-5)
        running_means.append(mean)
        running_vars.append(var)
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grouped.grad, x_plain.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grouped.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grouped.bias.grad, plain.bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grouped.running_mean, torch.stack(running_means).mean(0))
    torch.testing.assert_close(grouped.running_var, torch.stack(running_vars).mean(0))
    assert grouped.group_of_rows is None  # the groups end with the block


def test_without_groups_or_in_eval_it_is_plain_batch_norm():
    plain, grouped = _layers()
    x = torch.randn(8, 5, 2, 2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(grouped(x), plain(x))
    with batch_norm_groups(grouped, torch.zeros(8, dtype=torch.long), 1):
        grouped.eval(), plain.eval()
        torch.testing.assert_close(grouped(x), plain(x))
    assert set(grouped.state_dict()) == set(plain.state_dict())  # a trained backbone loads into timm's


@pytest.mark.parametrize("batch, groups", [(256, 8), (32, 2), (18, 3)])
def test_a_query_group_and_a_key_group_share_one_in_g_images(batch: int, groups: int):
    queries = contiguous_groups(batch, groups, torch.device("cpu"))
    keys = strided_groups(batch, groups, torch.device("cpu"))
    size = batch // groups
    assert torch.bincount(queries).tolist() == [size] * groups == torch.bincount(keys).tolist()
    for image in range(batch):
        shared = ((queries == queries[image]) & (keys == keys[image])).sum().item()
        assert shared == size // groups  # 1/G of a group: the reference's random shuffle, in expectation


def _mocov2(shuffle_bn: bool) -> MoCoV2:
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", 32)
    config = MoCoV2.Config(proj_hidden_dim=32, proj_dim=16, queue_size=16, bn_group_size=4)
    config.shuffle_bn = shuffle_bn
    return MoCoV2(backbone, config, TrainContext(1, 1, 10, 32)).train()


def _embeddings(method: MoCoV2, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries and keys ``training_step`` compares, read from the loss's inputs."""
    seen = {}
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: seen.setdefault(name, out.detach()))
        for name, module in (("q", method.head), ("k", method.key_head))
    ]
    method.training_step(views, torch.zeros(8), Step(0, 0, 1, 1))
    for hook in hooks:
        hook.remove()
    return seen["q"].detach(), seen["k"].detach()


def test_mocov2_queries_and_keys_see_only_their_groups_statistics():
    generator = torch.Generator().manual_seed(3)
    views = [torch.randn(8, 3, 32, 32, generator=generator) for _ in range(2)]
    changed = [v.clone() for v in views]  # bn_group_size 4: groups of images 0-3 and 4-7, even and odd
    changed[0][4:] = torch.randn(4, 3, 32, 32, generator=generator)  # 2nd query group
    changed[1][1::2] = torch.randn(4, 3, 32, 32, generator=generator)  # 2nd key group
    method = _mocov2(shuffle_bn=True)
    state = copy.deepcopy(method.state_dict())
    q, k = _embeddings(method, views)
    method.load_state_dict(state)
    q2, k2 = _embeddings(method, changed)
    torch.testing.assert_close(q2[:4], q[:4], rtol=0, atol=1e-6)  # the first group never saw the change
    torch.testing.assert_close(k2[0::2], k[0::2], rtol=0, atol=1e-6)
    assert not torch.allclose(q2[4:], q[4:]) and not torch.allclose(k2[1::2], k[1::2])

    method = _mocov2(shuffle_bn=False)  # global BatchNorm: every image's statistics change
    state = copy.deepcopy(method.state_dict())
    q, k = _embeddings(method, views)
    method.load_state_dict(state)
    q2, k2 = _embeddings(method, changed)
    assert not torch.allclose(q2[:4], q[:4], atol=1e-4) and not torch.allclose(k2[0::2], k[0::2], atol=1e-4)
