"""iBOT and DINOv2 (methods/ibot.py, methods/dinov2.py), and the DINOv2 options of DINO: what each method
promises beyond the generic contract of tests/test_methods.py."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench import (
    SSLBenchError,
    Step,
    TrainContext,
    create_backbone,
    dino_loss,
    get_method,
    ibot_patch_loss,
    koleo_loss,
    multicrop_forward,
    sinkhorn_knopp,
)

SIZE = 32
SMALL = {"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "local_crops_number": 2}
STEP = Step(iteration=1, epoch=1, iterations_per_epoch=1, total_iterations=2)


def build(
    name: str, arch: str = "vit_tiny16", image_size: int = SIZE, epochs: int = 2, ipe: int = 1, **options
):
    method_cls = get_method(name)
    torch.manual_seed(0)
    backbone = create_backbone(arch, image_size, drop_path_rate=0.0)
    method = method_cls(
        backbone, method_cls.Config(**(SMALL | options)), TrainContext(epochs, ipe, 10, image_size)
    )
    return method.train()


def make_views(batch: int = 4, local: int = 2, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    globals_ = [torch.randn(batch, 3, SIZE, SIZE, generator=g) for _ in range(2)]
    return globals_ + [torch.randn(batch, 3, SIZE // 2, SIZE // 2, generator=g) for _ in range(local)]


def fixed_masks(method, batch: int = 4) -> Tensor:
    """Half of the 2B global crops masked on a fixed pattern, the others not at all."""
    n = method.backbone.grid(SIZE)[0] ** 2
    masks = torch.zeros(2 * batch, n, dtype=torch.bool)
    masks[0, :10] = masks[3, 5:30] = masks[5, ::3] = masks[6, -7:] = True
    return masks


def module_of(name: str):
    return sys.modules[get_method(name).__module__]


# --------------------------------------------------------------------------------------------------------
# Masked patches: the student sees the mask token, the teacher the whole crop
# --------------------------------------------------------------------------------------------------------


def embedding_inputs(backbone) -> list[Tensor]:
    """What enters the blocks, per forward: patch embeddings (masked or not) plus positions."""
    seen: list[Tensor] = []
    backbone.model.pos_drop.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    return seen


def test_mask_token_replaces_exactly_the_masked_patches(monkeypatch):
    method = build("ibot")
    with torch.no_grad():
        method.mask_token.normal_()  # not zero, so the replacement is visible
    masks = fixed_masks(method)
    monkeypatch.setattr(method, "draw_masks", lambda crops, iteration=0: masks)
    views = make_views()
    student, teacher = embedding_inputs(method.backbone), embedding_inputs(method.teacher_backbone)
    method.training_step(views, torch.zeros(4), STEP)
    masked_student = student[0]  # global crops first, then the local crops (no mask)
    patch_embed = []
    method.backbone.model.patch_embed.register_forward_hook(lambda _m, _a, out: patch_embed.append(out))
    with torch.no_grad():
        method.backbone.forward_tokens(torch.cat(views[:2]))
    plain = student[-1]
    tokens = patch_embed[0].flatten(1, 2)
    # Visible patches and the class token: unchanged; masked ones: the mask token at the same position.
    torch.testing.assert_close(masked_student[:, 0], plain[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(masked_student[:, 1:][~masks], plain[:, 1:][~masks], rtol=0, atol=0)
    expected = plain[:, 1:] - tokens + method.mask_token[0]
    torch.testing.assert_close(masked_student[:, 1:][masks], expected[masks], rtol=0, atol=1e-6)
    assert not torch.allclose(masked_student[:, 1:][masks], plain[:, 1:][masks])
    # Local crops: no mask token anywhere.
    assert student[1].shape[1] == 1 + method.backbone.grid(SIZE // 2)[0] ** 2
    # The teacher's embeddings are those of the whole crops.
    assert len(teacher) == 1
    teacher_plain = embedding_inputs(method.teacher_backbone)
    with torch.no_grad():
        method.teacher_backbone.forward_tokens(torch.cat(views[:2]))
    torch.testing.assert_close(teacher[0], teacher_plain[0], rtol=0, atol=0)


def test_an_empty_mask_gives_the_unmasked_output():
    method = build("ibot")
    with torch.no_grad():
        method.mask_token.normal_()
        images = torch.cat(make_views()[:2])
        none = torch.zeros(images.shape[0], method.backbone.grid(SIZE)[0] ** 2, dtype=torch.bool)
        cls, patches = method.backbone.forward_tokens(images, mask=none, mask_token=method.mask_token[0])
        plain_cls, plain_patches = method.backbone.forward_tokens(images)
    assert torch.equal(cls, plain_cls) and torch.equal(patches, plain_patches)


@pytest.mark.parametrize("name", ["ibot", "dinov2"])
def test_teacher_sees_no_mask_and_student_gets_the_token(name, monkeypatch):
    method = build(name)
    calls = {"teacher": [], "student": []}
    for role, backbone in (("teacher", method.teacher_backbone), ("student", method.backbone)):
        original = backbone.forward_tokens

        def record(images, _original=original, _role=role, **kwargs):
            calls[_role].append(kwargs)
            return _original(images, **kwargs)

        monkeypatch.setattr(backbone, "forward_tokens", record)
    method.training_step(make_views(), torch.zeros(4), STEP)
    assert calls["teacher"] == [{}]
    (student,) = calls["student"]
    assert student["mask"].dtype == torch.bool and student["mask_token"] is not None
    assert student["mask"].shape == (8, method.backbone.grid(SIZE)[0] ** 2)


def test_masks_follow_dinov2s_rule():
    method = build("ibot")
    n = method.backbone.grid(SIZE)[0] ** 2
    torch.manual_seed(3)
    masks = method.draw_masks(torch.zeros(16, 3, SIZE, SIZE))
    counts = masks.sum(dim=1)
    assert masks.shape == (16, n)
    assert int((counts > 0).sum()) == 8  # exactly half of the global crops
    assert int(counts.max()) <= int(0.5 * n)


# --------------------------------------------------------------------------------------------------------
# iBOT's losses and centres
# --------------------------------------------------------------------------------------------------------


def test_masked_patch_loss_is_ibot_patch_loss_on_the_masked_patches():
    g = torch.Generator().manual_seed(0)
    batch, n, k = 3, 16, 12
    student = torch.randn(2, batch, n, k, generator=g)
    teacher = torch.randn(2, batch, n, k, generator=g)
    masks = torch.rand(2, batch, n, generator=g) < 0.3
    masks[1, 2] = False  # an image without a masked patch adds 0
    center = torch.randn(1, 1, k, generator=g)
    reference = ibot_patch_loss(list(student), list(teacher), list(masks), center, 0.1, 0.07)
    flat = masks.flatten(0, 1)
    targets = F.softmax((teacher.flatten(0, 1)[flat] - center[0]) / 0.07, dim=-1)
    loss = module_of("ibot").masked_patch_loss(student.flatten(0, 1)[flat], targets, flat, 0.1)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)


def test_centres_move_toward_the_teacher_means(monkeypatch):
    method = build("ibot")
    masks = fixed_masks(method)
    monkeypatch.setattr(method, "draw_masks", lambda crops, iteration=0: masks)
    g = torch.Generator().manual_seed(1)
    start, patch_start = (
        torch.randn(method.center.shape, generator=g),
        torch.randn(method.patch_center.shape, generator=g),
    )
    method.center.copy_(start)
    method.patch_center.copy_(patch_start)
    views = make_views()
    with torch.no_grad():
        cls, patches = method.teacher_backbone.forward_tokens(torch.cat(views[:2]))
        cls_mean = method.teacher_head(cls).mean(dim=0, keepdim=True)
        patch_mean = method.teacher_head(patches).mean(dim=1).mean(dim=0).reshape(1, 1, -1)
    method.training_step(views, torch.zeros(4), STEP)
    torch.testing.assert_close(method.center, 0.9 * start + 0.1 * cls_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(method.patch_center, 0.9 * patch_start + 0.1 * patch_mean, rtol=0, atol=1e-6)


def test_loss_weights_and_local_crops(monkeypatch):
    """``lambda1 * L_cls + lambda2 * L_MIM``; local crops enter the class-token loss only."""
    outputs = {}
    for key, lambdas, seed in (
        ("plain", (1.0, 1.0), 0),
        ("weighted", (0.5, 2.0), 0),
        ("locals", (1.0, 1.0), 7),
    ):
        method = build("ibot", lambda1=lambdas[0], lambda2=lambdas[1])
        masks = fixed_masks(method)
        monkeypatch.setattr(method, "draw_masks", lambda crops, iteration=0, _m=masks: _m)
        views = make_views()
        views[2:] = make_views(seed=seed)[2:]
        with torch.no_grad():
            outputs[key] = method.training_step(views, torch.zeros(4), STEP)
    plain, weighted, other_locals = outputs["plain"], outputs["weighted"], outputs["locals"]
    torch.testing.assert_close(plain.loss, plain.logs["cls_loss"] + plain.logs["patch_loss"])
    torch.testing.assert_close(weighted.loss, 0.5 * plain.logs["cls_loss"] + 2.0 * plain.logs["patch_loss"])
    assert torch.equal(other_locals.logs["patch_loss"], plain.logs["patch_loss"])
    assert not torch.equal(other_locals.logs["cls_loss"], plain.logs["cls_loss"])


@pytest.mark.parametrize("name", ["ibot", "dinov2"])
def test_refuses_a_resnet_in_one_line(name):
    with pytest.raises(SSLBenchError) as caught:
        build(name, arch="resnet18")
    message = str(caught.value)
    assert "\n" not in message and "ViT" in message and "resnet18" in message
    assert get_method(name).families == ("vit",)


def test_temperature_schedules():
    ibot = build("ibot", epochs=5, ipe=3, warmup_teacher_temp_epochs=2)
    assert [ibot.temperatures(Step(i, i // 3, 3, 15))[1] for i in (0, 3, 6, 14)] == pytest.approx(
        [0.04, 0.07, 0.07, 0.07]
    )  # per epoch, as the reference's teacher_temp2_schedule[epoch]
    dinov2 = build("dinov2", epochs=2, ipe=3, warmup_teacher_temp_epochs=1)
    temps = [dinov2.temperatures(Step(i, i // 3, 3, 6)) for i in range(6)]
    assert [t for t, _ in temps] == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07, 0.07])  # per iteration
    assert all(t == p for t, p in temps)


def test_head_sizes_and_untied_heads():
    ibot = build("ibot", out_dim=None)
    assert ibot.config.out_dim == ibot.config.patch_out_dim == 4096
    assert ibot.patch_head is None and len(ibot.momentum_pairs()) == 2 and len(ibot.parameter_rules()) == 1
    assert ibot.eval_backbone() is ibot.teacher_backbone
    assert build("ibot", image_size=96, out_dim=None).config.out_dim == 8192
    dinov2 = build("dinov2", out_dim=None)
    assert dinov2.config.out_dim == 4096 and get_method("dinov2").default_out_dims == (4096, 65536)
    assert dinov2.patch_head is not dinov2.head and dinov2.patch_head.last_layer.out_features == 4096
    assert len(dinov2.momentum_pairs()) == 3
    assert [rule.module for rule in dinov2.parameter_rules()] == [
        dinov2.head.last_layer,
        dinov2.patch_head.last_layer,
    ]
    assert dinov2.resolved_options()["centering"] == "sinkhorn_knopp"
    assert dinov2.resolved_options()["koleo_weight"] == 0.1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"centering": "mean"}, "centering must be one of"),
        ({"mask_ratio": (0.5, 0.1)}, "mask_ratio"),
        ({"mask_probability": 0.0}, "mask_probability"),
        ({"koleo_weight": -1.0}, "koleo_weight"),
        ({"out_dim": 64, "patch_out_dim": 32, "shared_head": True}, "shared_head"),
    ],
)
@pytest.mark.parametrize("name", ["ibot", "dinov2"])
def test_bad_options_are_refused(name, options, message):
    with pytest.raises(SSLBenchError, match=f"{name}.{message}"):
        get_method(name).Config(**options)


def test_paper_recipes():
    for name, lr in (("ibot", 5e-4), ("dinov2", 0.004 * 2**0.5 / 8)):
        recipe = get_method(name).paper_recipe("vit", 224, 100)
        assert recipe.train["lr"] == pytest.approx(lr) and recipe.train["optimizer"] == "adamw"
        get_method(name).Config(**recipe.options)  # every option the recipe sets exists
        assert get_method(name).paper_recipe("resnet", 224, 100) is None


# --------------------------------------------------------------------------------------------------------
# DINOv2: Sinkhorn-Knopp codes and KoLeo
# --------------------------------------------------------------------------------------------------------


def test_dinov2_targets_are_sinkhorn_codes_and_no_centre_moves():
    method = build("dinov2")
    views = make_views()
    with torch.no_grad():
        cls, patches = method.teacher_backbone.forward_tokens(torch.cat(views[:2]))
        teacher_out = list(method.teacher_head(cls).chunk(2))
        logits, center, temp = method.class_targets(teacher_out, 0.05)
        masks = fixed_masks(method)
        codes, projected = method.patch_targets(patches, masks, 0.06)
    assert temp == 1.0 and not center.any() and projected is None
    class_codes = torch.cat(logits).exp()
    torch.testing.assert_close(class_codes.sum(dim=1), torch.ones(8))
    torch.testing.assert_close(
        class_codes, sinkhorn_knopp(torch.cat(teacher_out), 0.05, 3), rtol=1e-5, atol=1e-7
    )
    masked_rows = method.teacher_patch_head(patches[masks])
    assert codes.shape == (int(masks.sum()), method.config.patch_out_dim)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(codes.shape[0]))
    torch.testing.assert_close(codes, sinkhorn_knopp(masked_rows, 0.06, 3))
    method.training_step(views, torch.zeros(4), STEP)
    assert not method.center.any() and not method.patch_center.any()


def test_dinov2_koleo_enters_the_loss_with_its_weight(monkeypatch):
    results = {}
    for weight in (0.0, 0.1, 0.3):
        method = build("dinov2", koleo_weight=weight)
        masks = fixed_masks(method)
        monkeypatch.setattr(method, "draw_masks", lambda crops, iteration=0, _m=masks: _m)
        with torch.no_grad():
            cls, _ = method.backbone.forward_tokens(
                torch.cat(make_views()[:2]), mask=masks, mask_token=method.mask_token[0]
            )
            out = method.training_step(make_views(), torch.zeros(4), STEP)
        results[weight] = (out, sum(koleo_loss(c) for c in cls.chunk(2)))
    base = results[0.0][0].loss
    for weight in (0.1, 0.3):
        out, koleo = results[weight]
        torch.testing.assert_close(out.logs["koleo_loss"], weight * koleo)
        torch.testing.assert_close(out.loss, base + weight * koleo)
    assert "koleo_loss" not in results[0.0][0].logs


# --------------------------------------------------------------------------------------------------------
# DINO's DINOv2 options
# --------------------------------------------------------------------------------------------------------


def cross_entropy_pairs(student_out: list[Tensor], targets: list[Tensor], student_temp: float) -> Tensor:
    terms = [
        torch.sum(-q * F.log_softmax(s / student_temp, dim=-1), dim=-1).mean()
        for t_idx, q in enumerate(targets)
        for s_idx, s in enumerate(student_out)
        if s_idx != t_idx
    ]
    return torch.stack(terms).mean()


def test_dino_sinkhorn_and_koleo_differ_from_default_only_by_those_terms():
    views = make_views()
    default = build("dino")
    variant = build("dino", centering="sinkhorn_knopp", koleo_weight=0.1)
    start = torch.randn(default.center.shape, generator=torch.Generator().manual_seed(0))
    default.center.copy_(start)
    variant.center.copy_(start)
    with torch.no_grad():
        teacher_out = multicrop_forward(default.teacher_backbone, views[:2], default.teacher_head)
        features = multicrop_forward(default.backbone, views)
        student_out = list(default.head(torch.cat(features)).chunk(len(views)))
        loss = default.training_step(views, torch.zeros(4), STEP).loss
        variant_out = variant.training_step(views, torch.zeros(4), STEP)
    torch.testing.assert_close(loss, dino_loss(student_out, teacher_out, start, 0.1, 0.04), rtol=0, atol=0)
    codes = list(sinkhorn_knopp(torch.cat(teacher_out), 0.04, 3).chunk(2))
    koleo = 0.1 * (koleo_loss(features[0]) + koleo_loss(features[1]))
    expected = cross_entropy_pairs(student_out, codes, 0.1) + koleo
    torch.testing.assert_close(variant_out.loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(variant_out.logs["koleo_loss"], koleo)
    assert torch.equal(variant.center, start) and not torch.equal(default.center, start)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"centering": "sinkhorn"}, "dino.centering must be one of ema, sinkhorn_knopp"),
        ({"koleo_weight": -0.1}, "koleo"),
    ],
)
def test_dino_refuses_bad_dinov2_options(options, message):
    with pytest.raises(SSLBenchError, match=message):
        get_method("dino").Config(**options)
