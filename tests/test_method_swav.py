"""SwAV's own promises: unit-norm prototypes frozen in epoch 1, codes from the global crops without
gradient, the queue (newest embeddings of every step, used only once started and full, restored exactly,
shared between ranks as the reference's per-rank queues), the sizes and the paper recipe."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F
from test_methods import labels_for, make_views
from torch import Tensor, nn
from two_ranks import loss_and_grads_in_one_process, loss_and_grads_on_ranks

from sslbench import SSLBenchError, Step, TrainContext, ViewRecipe, codes_with_queue, create_backbone
from sslbench.losses import sinkhorn_knopp
from sslbench.method.registry import get_method
from sslbench.training.optim import build_optimizer, parameter_groups
from sslbench.training.step import optimization_step

SMALL = {"proj_hidden_dim": 64, "proj_dim": 32, "num_prototypes": 16, "local_crops_number": 2}
BATCH = 4  # make_views' images per view


def build(image_size: int = 32, ipe: int = 2, epochs: int = 3, seed: int = 0, **options):
    method_cls = get_method("swav")
    torch.manual_seed(seed)
    context = TrainContext(epochs, ipe, 10, image_size)
    return method_cls(
        create_backbone("resnet18", image_size), method_cls.Config(**(SMALL | options)), context
    )


def swav_module():
    return importlib.import_module(get_method("swav").__module__)


def sgd(method: nn.Module) -> torch.optim.Optimizer:
    optimizer = build_optimizer("sgd", parameter_groups([method]), momentum=0.9)
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    return optimizer


def run_step(method, optimizer, views, iteration: int, ipe: int = 2) -> Tensor:
    step = Step(iteration, iteration // ipe, ipe, 3 * ipe)
    loss, _ = optimization_step(
        method, optimizer, views, labels_for(), step, 0.0, 0.0, contextlib.nullcontext()
    )
    return loss


@pytest.fixture
def spy(monkeypatch):
    """Every call of the method's ``codes_with_queue``: (scores, queue_scores, codes)."""
    calls = []

    def recording(scores, queue_scores, epsilon, iterations):
        codes = codes_with_queue(scores, queue_scores, epsilon, iterations)
        calls.append((scores, queue_scores, codes))
        return codes

    monkeypatch.setattr(swav_module(), "codes_with_queue", recording)
    return calls


def test_prototypes_unit_norm_and_frozen_in_first_epoch():
    method = build().train()
    optimizer = sgd(method)
    views = make_views(method.view_recipe())
    weight = method.prototypes.weight
    assert not torch.allclose(weight.norm(dim=1), torch.ones(weight.shape[0]))  # PyTorch's init
    method.training_step(views, labels_for(), Step(0, 0, 2, 6))
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(weight.shape[0]))  # normalised before use
    start = weight.detach().clone()
    others = [p.detach().clone() for p in method.projection_head.parameters()]
    for iteration in (0, 1):  # epoch 0: the rest learns, the prototypes stay (up to renormalisation)
        run_step(method, optimizer, views, iteration)
        torch.testing.assert_close(weight, start, rtol=0, atol=1e-6)
    assert all(
        not torch.equal(a, b) for a, b in zip(others, method.projection_head.parameters(), strict=True)
    )
    run_step(method, optimizer, views, 2)  # epoch 1: they learn
    assert (weight - start).abs().max() > 1e-4
    method.training_step(views, labels_for(), Step(3, 1, 2, 6))
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(weight.shape[0]))
    rules = method.parameter_rules()
    assert len(rules) == 1 and rules[0].module is method.prototypes and rules[0].frozen_epochs == 1


def test_codes_come_from_the_global_crops_without_gradient(spy):
    method = build().eval()  # BatchNorm on running statistics: each crop's scores stand alone
    views = make_views(method.view_recipe(), seed=1)
    out = method.training_step(views, labels_for(), Step(0, 0, 2, 6))
    assert len(spy) == 2 and all(queue is None for _, queue, _ in spy)
    with torch.no_grad():
        scores = [method.prototypes(F.normalize(method.projection_head(method.backbone(v)))) for v in views]
    for (got, _, codes), want in zip(spy, scores[:2], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert not codes.requires_grad
        torch.testing.assert_close(codes, sinkhorn_knopp(want, 0.05, 3), rtol=0, atol=1e-5)
        torch.testing.assert_close(codes.sum(dim=1), torch.ones(BATCH))
    # Other local crops: the same codes
    local = [torch.randn_like(v) for v in views[2:]]
    method.training_step(views[:2] + local, labels_for(), Step(0, 0, 2, 6))
    for (_, _, before), (_, _, after) in zip(spy[:2], spy[2:], strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    # The loss of the step: each global crop's codes, held fixed, predicted from every other crop
    want = (
        -sum(
            (spy[i][2] * F.log_softmax(scores[v] / 0.1, dim=1)).sum(dim=1).mean() / (len(views) - 1)
            for i in range(2)
            for v in range(len(views))
            if v != i
        )
        / 2
    )
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.embeddings.norm(dim=1), torch.ones(2 * BATCH))


def test_queue_holds_the_newest_embeddings_and_is_used_once_started_and_full(spy):
    method = build(queue_length=2 * BATCH, epoch_queue_starts=1).train()
    views = [make_views(method.view_recipe(), seed=s) for s in range(5)]
    assert method.queue.shape == (2, 2 * BATCH, SMALL["proj_dim"])
    for iteration in (0, 1):  # epoch 0: before epoch_queue_starts, nothing enters
        out = method.training_step(views[iteration], labels_for(), Step(iteration, 0, 2, 6))
        assert out.logs["queue_in_use"] == 0.0
    assert not method.queue.any() and not method.queue_pointer.any()
    assert all(queue is None for _, queue, _ in spy)
    embeddings = []
    for iteration in (2, 3, 4):  # epoch 1 on: each step writes its global crops' embeddings
        before = method.queue.clone()
        out = method.training_step(views[iteration], labels_for(), Step(iteration, iteration // 2, 2, 6))
        prototypes = method.prototypes.weight.detach().clone()  # as normalised in the step
        z = out.embeddings.detach().reshape(2, BATCH, -1)
        embeddings.append(z)
        rows = slice(0, BATCH) if iteration % 2 == 0 else slice(BATCH, 2 * BATCH)  # a ring, in batch order
        torch.testing.assert_close(method.queue[:, rows], z, rtol=0, atol=1e-6)
        others = slice(BATCH, 2 * BATCH) if iteration % 2 == 0 else slice(0, BATCH)
        assert torch.equal(method.queue[:, others], before[:, others])
        assert method.queue_pointer.tolist() == [(iteration - 1) % 2 * BATCH] * 2
        full_before = iteration == 4
        assert out.logs["queue_in_use"] == float(full_before)
        for crop, (scores, queue_scores, codes) in enumerate(spy[-2:]):
            if not full_before:
                assert queue_scores is None
                continue
            # The queue as it was before this step, scored against the current prototypes
            torch.testing.assert_close(queue_scores, before[crop] @ prototypes.t(), rtol=0, atol=1e-6)
            joint = sinkhorn_knopp(torch.cat([queue_scores, scores]), 0.05, 3)[-BATCH:]
            torch.testing.assert_close(codes, joint)
            assert not torch.allclose(codes, sinkhorn_knopp(scores, 0.05, 3), atol=1e-4)
    # The newest 2 steps fill the queue: rows 0..3 from the last step, 4..7 from the one before
    torch.testing.assert_close(
        method.queue, torch.cat([embeddings[2], embeddings[1]], dim=1), rtol=0, atol=1e-6
    )


def test_queue_survives_a_state_dict_round_trip_with_a_bit_identical_step():
    method = build(queue_length=2 * BATCH, epoch_queue_starts=0).train()
    optimizer = sgd(method)
    views = [make_views(method.view_recipe(), seed=s) for s in range(3)]
    empty = copy.deepcopy({"method": method.state_dict(), "optimizer": optimizer.state_dict()})
    for iteration in (0, 1):
        run_step(method, optimizer, views[iteration], iteration)
    assert method.queue.any(dim=-1).all()  # full: the next step uses it
    saved = copy.deepcopy({"method": method.state_dict(), "optimizer": optimizer.state_dict()})
    assert {"queue", "queue_pointer"} <= set(saved["method"])
    loss = run_step(method, optimizer, views[2], 2)
    after = {k: v.clone() for k, v in method.state_dict().items()}
    resumed = build(seed=1, queue_length=2 * BATCH, epoch_queue_starts=0).train()
    resumed.load_state_dict(saved["method"])
    resumed_optimizer = sgd(resumed)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    assert torch.equal(run_step(resumed, resumed_optimizer, views[2], 2), loss)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, after[key]), key
    # A method that used its full queue, given an empty one, waits again until it is full
    fresh = build(queue_length=2 * BATCH, epoch_queue_starts=0).train()
    fresh_loss = run_step(fresh, sgd(fresh), views[0], 0)
    resumed.load_state_dict(empty["method"])
    resumed_optimizer.load_state_dict(empty["optimizer"])
    assert torch.equal(run_step(resumed, resumed_optimizer, views[0], 0), fresh_loss)


QUEUE = 8


def queue_codes_probe(scores: Tensor, queue_copies: Tensor, prototypes: Tensor) -> Tensor:
    """On each rank a copy of the common queue (``queue_copies`` holds one per rank, chunked to the
    ranks), the rank's share of it scored as the method does; the gradient on ``scores`` is the codes."""
    share = swav_module().rank_share(queue_copies[:QUEUE])
    codes = codes_with_queue(scores, share @ prototypes[: scores.shape[1]].t(), 0.05, 3)
    return (codes * scores).sum()


def test_rank_shares_of_the_queue_give_the_codes_of_one_process():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    queue = F.normalize(torch.randn(QUEUE, 3, generator=gen, dtype=torch.float64), dim=1)
    prototypes = F.normalize(torch.randn(5, 3, generator=gen, dtype=torch.float64), dim=1)
    inputs = [scores, queue.repeat(2, 1), prototypes.repeat(2, 1)]
    _, grads = loss_and_grads_on_ranks(queue_codes_probe, inputs)
    _, one = loss_and_grads_in_one_process(queue_codes_probe, inputs)
    torch.testing.assert_close(grads[0] * 2, one[0], rtol=0, atol=1e-9)  # DDP's averaging halves them
    torch.testing.assert_close(
        one[0], sinkhorn_knopp(torch.cat([queue @ prototypes.t(), scores]), 0.05, 3)[-8:]
    )


def test_sizes_views_and_options():
    method = build(num_prototypes=None)
    assert method.config.num_prototypes == 300 and method.resolved_options()["num_prototypes"] == 300
    assert build(image_size=224, num_prototypes=None).prototypes.out_features == 3000
    head = get_method("swav")(create_backbone("resnet18", 32), get_method("swav").Config(), method.context)
    linear1, norm, relu, linear2 = head.projection_head
    assert (linear1.out_features, linear2.out_features) == (2048, 128)
    assert linear1.bias is not None and linear2.bias is not None
    assert isinstance(norm, nn.BatchNorm1d) and isinstance(relu, nn.ReLU)
    assert head.prototypes.bias is None and head.queue.shape == (2, 0, 128)
    assert head.view_recipe() == ViewRecipe("symmetric", 6, (0.14, 1.0), (0.05, 0.14))
    config = get_method("swav").Config
    for bad in (
        {"temperature": 0.0},
        {"epsilon": -1.0},
        {"queue_length": -1},
        {"local_crops_scale": (0.2, 0.1)},
    ):
        with pytest.raises(SSLBenchError, match="swav."):
            config(**bad)


def test_paper_recipe_is_the_batch_4096_command():
    """scripts/swav_800ep_pretrain.sh: --base_lr 4.8 at 64 x 64 images, --final_lr 0.0048, --wd 1e-6,
    --warmup_epochs 10, no clipping (LARC with clip=False), --queue_length 0."""
    method_cls = get_method("swav")
    assert method_cls.paper_recipe("vit", 224, 100) is None
    recipe = method_cls.paper_recipe("resnet", 224, 800)
    assert recipe == method_cls.paper_recipe("resnet", 32, 2)
    assert dict(recipe.train) == {
        "optimizer": "lars",
        "lr": 0.3,
        "min_lr": 0.0048,
        "warmup_epochs": 10,
        "weight_decay": 1e-6,
        "weight_decay_end": 1e-6,
        "momentum": 0.9,
        "clip_grad": 0.0,
    }
    defaults = dataclasses.asdict(method_cls.Config())
    assert all(defaults[key] == value for key, value in recipe.options.items())
