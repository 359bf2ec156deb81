"""MoCo v2 and MoCo v3: what each promises beyond the generic method contract (tests/test_methods.py).

MoCo v2: the queue holds the newest normalised keys of every step at the pointer, wrapping around a
queue that is not a multiple of the batch, and a resumed step is bit-identical; the key encoder moves by
the EMA only. MoCo v3: the frozen random patch projection never trains (and does when switched off);
the loss is the symmetrised ``ctr(q1, k2) + ctr(q2, k1)``; family-dependent heads and temperatures.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from sslbench_methods.mocov2 import MoCoV2
from sslbench_methods.mocov3 import MoCoV3, MoCoV3MLP
from torch import Tensor, nn

from sslbench import Method, Step, TrainContext, create_backbone, info_nce_with_queue, moco_v3_loss
from sslbench.training.optim import build_optimizer, parameter_groups
from sslbench.training.step import optimization_step

SIZE, BATCH = 32, 8
V2_SMALL = {"proj_hidden_dim": 32, "proj_dim": 16}
V3_SMALL = {"proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64}


def build(method_cls: type[Method], arch: str, image_size: int = SIZE, seed: int = 0, **options) -> Method:
    torch.manual_seed(seed)
    backbone = create_backbone(arch, image_size)
    return method_cls(backbone, method_cls.Config(**options), TrainContext(2, 2, 10, image_size)).train()


def views(seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, 3, SIZE, SIZE, generator=generator) for _ in range(2)]


def optimizer_for(method: Method, name: str = "sgd") -> torch.optim.Optimizer:
    optimizer = build_optimizer(name, parameter_groups([method]), momentum=0.9)
    for group in optimizer.param_groups:
        group["lr"] = 0.05
        group["weight_decay"] = 0.1 if group["regularized"] else 0.0
    return optimizer


def train_step(method: Method, optimizer: torch.optim.Optimizer, batch: list[Tensor], it: int, ema: float):
    step = Step(it, it // 2, 2, 4)
    return optimization_step(
        method, optimizer, batch, torch.zeros(BATCH), step, 0.0, ema, contextlib.nullcontext()
    )


@torch.no_grad()
def keys_of(method: MoCoV2, batch: list[Tensor]) -> Tensor:
    return F.normalize(method.key_head(method.key_backbone(batch[1])), dim=-1)


# --------------------------------------------------------------------------------------------------------
# MoCo v2
# --------------------------------------------------------------------------------------------------------


def test_mocov2_queue_holds_the_newest_keys_and_resumes_bit_identically():
    method = build(MoCoV2, "vit_tiny16", queue_size=12, **V2_SMALL)  # 12: not a multiple of the batch 8
    assert method.queue.shape == (12, 16) and method.queue_ptr.tolist() == [0]
    torch.testing.assert_close(method.queue.norm(dim=1), torch.ones(12))
    initial = method.queue.clone()
    optimizer = optimizer_for(method)

    first, second = views(1), views(2)
    keys_1 = keys_of(method, first)
    with torch.no_grad():
        query = method.head(method.backbone(first[0]))
    loss, _ = train_step(method, optimizer, first, 0, ema=0.99)
    # InfoNCE against the queue as it was, positive first (the batch's own keys are not negatives)
    torch.testing.assert_close(loss, info_nce_with_queue(query, keys_1, initial, 0.2), rtol=0, atol=1e-6)
    torch.testing.assert_close(method.queue[:8], keys_1, rtol=0, atol=1e-6)
    assert torch.equal(method.queue[8:], initial[8:]) and method.queue_ptr.tolist() == [8]

    saved = copy.deepcopy({"method": method.state_dict(), "optimizer": optimizer.state_dict()})
    keys_2 = keys_of(method, second)  # the key encoder after one EMA update
    loss_2, _ = train_step(method, optimizer, second, 1, ema=0.99)
    # Rows 8..11 then (wrapping) 0..3 take the new keys; rows 4..7 keep the older ones
    torch.testing.assert_close(method.queue[8:], keys_2[:4], rtol=0, atol=1e-6)
    torch.testing.assert_close(method.queue[:4], keys_2[4:], rtol=0, atol=1e-6)
    torch.testing.assert_close(method.queue[4:8], keys_1[4:], rtol=0, atol=1e-6)
    assert method.queue_ptr.tolist() == [4]
    torch.testing.assert_close(method.queue.norm(dim=1), torch.ones(12))

    resumed = build(MoCoV2, "vit_tiny16", seed=1, queue_size=12, **V2_SMALL)
    assert not torch.equal(resumed.queue, saved["method"]["queue"])
    resumed.load_state_dict(saved["method"])
    resumed_optimizer = optimizer_for(resumed)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_loss, _ = train_step(resumed, resumed_optimizer, second, 1, ema=0.99)
    assert torch.equal(resumed_loss, loss_2)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, method.state_dict()[key]), key


def test_mocov2_key_encoder_is_not_trained_by_gradient():
    method = build(MoCoV2, "resnet18", **V2_SMALL)
    keys = [method.key_backbone, method.key_head]
    key_ids = {id(p) for module in keys for p in module.parameters()}
    optimizer = optimizer_for(method)
    assert not key_ids & {id(p) for group in optimizer.param_groups for p in group["params"]}
    before = [p.detach().clone() for module in keys for p in module.parameters()]
    online_before = [p.detach().clone() for p in method.head.parameters()]

    output = method.training_step(views(3), torch.zeros(BATCH), Step(0, 0, 2, 4))
    output.loss.backward()
    assert all(p.grad is None and not p.requires_grad for module in keys for p in module.parameters())
    assert all(p.grad is not None for p in method.head.parameters())
    method.zero_grad(set_to_none=True)
    # With EMA momentum 1 an optimisation step moves the query encoder and leaves the key encoder as it was
    train_step(method, optimizer, views(4), 1, ema=1.0)
    after = [p.detach() for module in keys for p in module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(online_before, method.head.parameters(), strict=True))


def test_mocov2_sizes_views_and_recipe():
    small = build(MoCoV2, "resnet18")
    assert small.config.queue_size == 4096 and small.resolved_options()["queue_size"] == 4096
    assert small.config.proj_hidden_dim == small.backbone.feat_dim  # the reference's mlp width
    assert small.queue.shape == (4096, 128)
    large = build(MoCoV2, "vit_tiny16", image_size=224, proj_hidden_dim=8, proj_dim=8)
    assert large.config.queue_size == 65536 and large.queue.shape == (65536, 8)
    head = small.head  # MoCo v2's mlp: Linear -> ReLU -> Linear, biases, no BatchNorm
    assert not [m for m in head.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(m.bias is not None for m in head.modules() if isinstance(m, nn.Linear))
    recipe = small.view_recipe()
    assert (recipe.kind, recipe.global_scale, recipe.color_strength) == ("symmetric", (0.2, 1.0), 0.5)
    paper = MoCoV2.paper_recipe("resnet", 224, 200)
    assert (paper.train["optimizer"], paper.train["lr"], paper.train["weight_decay"]) == ("sgd", 0.03, 1e-4)
    assert (paper.train["ema_momentum"], paper.train["ema_momentum_end"]) == (0.999, 0.999)
    assert (paper.train["warmup_epochs"], paper.train["min_lr"], paper.train["clip_grad"]) == (0, 0.0, 0.0)
    assert MoCoV2.paper_recipe("vit", 224, 200) is None


# --------------------------------------------------------------------------------------------------------
# MoCo v3
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen", [True, False])
def test_mocov3_patch_projection_frozen_by_default_and_switchable(frozen):
    options = {} if frozen else {"freeze_patch_embed": False}
    method = build(MoCoV3, "vit_tiny16", **V3_SMALL, **options)
    assert method.config.freeze_patch_embed is frozen
    projection = method.backbone.model.patch_embed.proj
    assert all(p.requires_grad is not frozen for p in projection.parameters())
    before = [p.detach().clone() for p in projection.parameters()]
    optimizer = optimizer_for(method, "adamw")
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all((id(p) in optimized) is not frozen for p in projection.parameters())

    output = method.training_step(views(5), torch.zeros(BATCH), Step(0, 0, 2, 4))
    output.loss.backward()
    if frozen:
        assert all(p.grad is None for p in projection.parameters())
    else:
        assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    # The rest of the backbone learns either way
    assert method.backbone.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    method.zero_grad(set_to_none=True)
    train_step(method, optimizer, views(6), 1, ema=0.99)
    unchanged = [torch.equal(a, b) for a, b in zip(before, projection.parameters(), strict=True)]
    assert all(unchanged) if frozen else not any(unchanged)


def test_mocov3_resnet_has_no_patch_projection_to_freeze():
    method = build(MoCoV3, "resnet18", **V3_SMALL)
    assert method.config.freeze_patch_embed is False
    assert all(p.requires_grad for p in method.backbone.parameters())


@pytest.mark.parametrize("arch", ["vit_tiny16", "resnet18"])
def test_mocov3_loss_is_symmetrised(arch):
    method = build(MoCoV3, arch, **V3_SMALL)
    batch = views(7)
    step = Step(0, 0, 2, 4)
    with torch.no_grad():  # train mode: each view batch-normalised on its own, as in the step
        loss = method.training_step(batch, torch.zeros(BATCH), step).loss
        swapped = method.training_step(batch[::-1], torch.zeros(BATCH), step).loss
        q1, q2 = (method.predictor(method.projector(method.backbone(v))) for v in batch)
        k1, k2 = (method.key_projector(method.key_backbone(v)) for v in batch)
    t = method.config.temperature

    def ctr(q: Tensor, k: Tensor) -> Tensor:  # Algorithm 1 of the paper
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / t
        return 2 * t * F.cross_entropy(logits, torch.arange(BATCH))

    torch.testing.assert_close(loss, ctr(q1, k2) + ctr(q2, k1), rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, moco_v3_loss(q1, k2, t) + moco_v3_loss(q2, k1, t), rtol=0, atol=1e-5)
    torch.testing.assert_close(swapped, loss, rtol=0, atol=1e-5)
    assert loss > ctr(q1, k2) + 1e-3  # both directions, not one


def _layers(mlp: MoCoV3MLP) -> tuple[int, nn.Module]:
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert all(m.bias is None for m in linears)  # _build_mlp: no Linear has a bias
    return len(linears), mlp.output[-1]


def test_mocov3_heads_and_temperature_follow_the_reference_per_family():
    vit = build(MoCoV3, "vit_tiny16", **V3_SMALL)
    assert (vit.config.proj_layers, vit.config.temperature, vit.config.crop_min) == (3, 0.2, 0.08)
    layers, last = _layers(vit.projector)
    assert layers == 3 and isinstance(last, nn.BatchNorm1d) and not last.affine
    layers, last = _layers(vit.predictor)
    assert layers == 2 and isinstance(last, nn.BatchNorm1d) and not last.affine  # MoCo_ViT: last BN too
    assert vit.view_recipe().kind == "asymmetric" and vit.view_recipe().global_scale == (0.08, 1.0)

    resnet = build(MoCoV3, "resnet18", **V3_SMALL)
    assert (resnet.config.proj_layers, resnet.config.temperature, resnet.config.crop_min) == (2, 1.0, 0.2)
    layers, last = _layers(resnet.projector)
    assert layers == 2 and isinstance(last, nn.BatchNorm1d) and not last.affine
    layers, last = _layers(resnet.predictor)
    assert layers == 2 and isinstance(last, nn.Linear)  # MoCo_ResNet: no BN after the predictor
    assert resnet.view_recipe().global_scale == (0.2, 1.0)
    assert build(MoCoV3, "resnet18", proj_layers=3, temperature=0.5, **V3_SMALL).config.temperature == 0.5


def test_mocov3_paper_recipes():
    vit = MoCoV3.paper_recipe("vit", 224, 300)
    assert (vit.train["optimizer"], vit.train["lr"], vit.train["weight_decay"]) == ("adamw", 1.5e-4, 0.1)
    assert (vit.train["warmup_epochs"], vit.train["ema_momentum"], vit.train["ema_momentum_end"]) == (
        40,
        0.99,
        1.0,
    )
    assert vit.options == {"temperature": 0.2, "freeze_patch_embed": True, "crop_min": 0.08}
    for epochs, expected in (
        (100, (0.6, 1e-6, 0.99)),
        (300, (0.3, 1e-6, 0.99)),
        (1000, (0.3, 1.5e-6, 0.996)),
    ):
        train = MoCoV3.paper_recipe("resnet", 224, epochs).train
        assert train["optimizer"] == "lars" and train["warmup_epochs"] == 10
        assert (train["lr"], train["weight_decay"], train["ema_momentum"]) == expected
