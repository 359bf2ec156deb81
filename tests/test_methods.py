"""Every registered method, on the small backbones, through the same checks (a new method is covered
without a test of its own); then what each built-in method promises on top; then the runner's loop.

Heads are shrunk through each method's ``Config`` (only fields that exist are set) to keep this fast.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from sslbench import ARCHS, Backbone, Method, SSLBenchError, Step, TrainContext, create_backbone
from sslbench.data.augment import ViewRecipe, build_view_transform
from sslbench.losses import byol_loss
from sslbench.method.registry import get_method, list_methods
from sslbench.testing import check_method
from sslbench.training.step import drop_frozen_gradients

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SIZE = 32
NUM_CLASSES = 10
SMALL_OPTIONS = {
    "out_dim": 64,
    "hidden_dim": 64,
    "bottleneck_dim": 32,
    "local_crops_number": 2,  # DINO
    "proj_hidden_dim": 64,
    "proj_dim": 32,
    "pred_hidden_dim": 64,  # BYOL, SimCLR, MoCo, Barlow Twins, VICReg
    "queue_size": 64,  # MoCo v2
    "num_prototypes": 32,  # SwAV
    "decoder_dim": 64,
    "decoder_depth": 1,  # MAE
}
SMALL_ARCHS = ["resnet18", "vit_tiny16"]
METHODS = sorted(list_methods())
TRAINABLE = [name for name in METHODS if get_method(name).trainable]
# Every (method, small arch) pair the method trains: the registry decides, so a new method is covered.
PAIRS = [
    (name, arch)
    for name in METHODS
    for arch in SMALL_ARCHS
    if ARCHS[arch].family in get_method(name).families
]
TRAINABLE_PAIRS = [(name, arch) for name, arch in PAIRS if name in TRAINABLE]
CPU = torch.device("cpu")


def small_config(method_cls: type[Method], **overrides):
    fields = {f.name for f in dataclasses.fields(method_cls.Config)}
    options = {k: v for k, v in {**SMALL_OPTIONS, **overrides}.items() if k in fields}
    return method_cls.Config(**options)


def build(
    name: str,
    arch: str | None = None,
    image_size: int = SIZE,
    epochs: int = 2,
    ipe: int = 1,
    drop_path_rate: float = 0.0,
    **overrides,
) -> Method:
    method_cls = get_method(name)
    arch = arch or next(a for a in SMALL_ARCHS if ARCHS[a].family in method_cls.families)
    backbone = create_backbone(arch, image_size, drop_path_rate)
    context = TrainContext(epochs, ipe, NUM_CLASSES, image_size)
    return method_cls(backbone, small_config(method_cls, **overrides), context)


def pil_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]


def make_views(recipe: ViewRecipe, n: int = 4, seed: int = 0) -> list[Tensor]:
    transform = build_view_transform(recipe, SIZE, MEAN, STD)
    per_image = [transform(img) for img in pil_images(n, seed)]
    return [torch.stack(views) for views in zip(*per_image, strict=True)]


def labels_for(n: int = 4) -> Tensor:
    return torch.arange(n) % NUM_CLASSES


def silent_at_init(backbone: Backbone) -> set[str]:
    """Parameters whose gradient is exactly zero at initialisation by design: timm zero-initialises the
    last BatchNorm of every ResNet residual branch, which silences the layers before it in the branch."""
    silent: set[str] = set()
    for block_name, block in backbone.named_modules():
        last = "bn3" if hasattr(block, "bn3") else "bn2"
        if not (hasattr(block, "conv1") and hasattr(block, last)) or block_name == "model":
            continue
        if torch.count_nonzero(getattr(block, last).weight) == 0:
            silent |= {
                f"{block_name}.{n}"
                for n, _ in block.named_parameters()
                if not n.startswith((f"{last}.", "downsample."))
            }
    return silent


def teacher_modules(method: Method) -> list[nn.Module]:
    return [ema for _, ema in method.momentum_pairs()]


# --------------------------------------------------------------------------------------------------------
# Every registered method
# --------------------------------------------------------------------------------------------------------


def test_registry_holds_the_builtins():
    assert {"dino", "byol", "simclr", "supervised", "random"} <= set(METHODS)
    assert get_method("random").trainable is False
    assert set(TRAINABLE) >= {"dino", "byol", "simclr", "supervised"}


@pytest.mark.parametrize("name", METHODS)
def test_method_interface(name):
    method_cls = get_method(name)
    assert method_cls.name == name
    assert dataclasses.is_dataclass(method_cls.Config)
    torch.manual_seed(0)
    method = build(name)
    if method_cls.trainable:  # an evaluation-only method needs no views
        recipe = method.view_recipe()
        assert isinstance(recipe, ViewRecipe) and recipe.num_views >= 1
    assert isinstance(method.resolved_options(), dict)
    json.dumps(method.resolved_options())  # recorded beside every number
    eval_backbone = method.eval_backbone()
    assert isinstance(eval_backbone, Backbone)
    expected_source = "backbone" if eval_backbone is method.backbone else "teacher backbone"
    assert method.feature_source == expected_source


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("dino", "teacher backbone"),
        ("byol", "backbone"),
        ("simclr", "backbone"),
        ("supervised", "backbone"),
        ("random", "backbone"),
    ],
)
def test_eval_backbone_and_feature_source(name, source):
    torch.manual_seed(0)
    method = build(name)
    expected = method.teacher_backbone if name == "dino" else method.backbone
    assert method.eval_backbone() is expected
    assert method.feature_source == source
    method.eval()
    with torch.no_grad():
        feats = method.eval_backbone().forward_eval(torch.randn(2, 3, SIZE, SIZE))
    assert feats["knn"].shape == (2, method.backbone.feat_dim)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_keeps_the_contract(name):
    """sslbench.testing.check_method, the same contract a plugin's author can run: two steps on the
    embedded data, gradients reaching the backbone, teachers moved by EMA only, a bit-identical step after
    a checkpoint round trip; a one-line refusal on a family the method does not train."""
    trained = check_method(name, SMALL_ARCHS, SMALL_OPTIONS)
    assert trained == [arch for arch in SMALL_ARCHS if ARCHS[arch].family in get_method(name).families]
    assert trained, f"{name} trains neither small backbone"


@pytest.mark.parametrize(("name", "arch"), TRAINABLE_PAIRS)
def test_every_trainable_parameter_gets_a_gradient(name, arch):
    """Heads, predictors, prototypes, mask tokens, decoders: nothing a method declares is dead weight
    (teachers aside, and the backbone parameters timm silences at initialisation)."""
    torch.manual_seed(0)
    method = build(name, arch)
    method.train()
    views = make_views(method.view_recipe())
    step = Step(iteration=3, epoch=1, iterations_per_epoch=2, total_iterations=4)  # past any freezing
    method.training_step(views, labels_for(), step).loss.backward()
    teacher_ids = {id(p) for t in teacher_modules(method) for p in t.parameters()}
    silent = {f"backbone.{n}" for n in silent_at_init(method.backbone)}
    missing = [
        n
        for n, p in method.named_parameters()
        if p.requires_grad
        and id(p) not in teacher_ids
        and n not in silent
        and (p.grad is None or not p.grad.any())
    ]
    assert not missing, f"trainable parameters without gradient: {missing}"


def test_random_is_not_trainable():
    method_cls = get_method("random")
    assert method_cls.trainable is False
    torch.manual_seed(0)
    method = build("random")
    assert method.momentum_pairs() == []
    assert method.eval_backbone() is method.backbone
    with pytest.raises(NotImplementedError):
        method.training_step(make_views(method.view_recipe()), labels_for(), Step(0, 0, 1, 1))


# --------------------------------------------------------------------------------------------------------
# DINO
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dino_vit() -> Method:
    torch.manual_seed(0)
    return build("dino", "vit_tiny16")


def test_dino_last_layer_frozen_in_first_epoch(dino_vit):
    method = dino_vit
    method.train()
    views = make_views(method.view_recipe())
    last = dict(method.head.last_layer.named_parameters())
    direction = last["parametrizations.weight.original1"]
    magnitude = last["parametrizations.weight.original0"]
    assert magnitude.requires_grad is False  # norm_last_layer: the weight norm's g is fixed at 1
    for epoch, kept in ((0, False), (1, True)):
        step = Step(iteration=epoch, epoch=epoch, iterations_per_epoch=1, total_iterations=2)
        method.zero_grad(set_to_none=True)
        method.training_step(views, labels_for(), step).loss.backward()
        assert direction.grad is not None
        drop_frozen_gradients(method, step)  # what the runner does after clipping
        assert (direction.grad is not None) is kept
        assert magnitude.grad is None
        # The rest of the head keeps its gradient either way.
        assert all(p.grad is not None for p in method.head.mlp.parameters())


def test_dino_center_moves_toward_teacher_mean(dino_vit):
    method = dino_vit
    method.train()
    views = make_views(method.view_recipe(), seed=3)
    start = torch.randn(method.center.shape, generator=torch.Generator().manual_seed(0))
    method.center.copy_(start)
    method.training_step(views, labels_for(), Step(0, 0, 1, 2))
    with torch.no_grad():
        teacher_out = method.teacher_head(method.teacher_backbone(torch.cat(views[:2])))
    batch_mean = teacher_out.mean(dim=0, keepdim=True)
    torch.testing.assert_close(method.center, 0.9 * start + 0.1 * batch_mean, rtol=0, atol=1e-6)
    assert (method.center - batch_mean).norm() < (start - batch_mean).norm()


def test_dino_teacher_temperature_warmup():
    torch.manual_seed(0)
    method = build(
        "dino",
        "vit_tiny16",
        epochs=5,
        ipe=3,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=2,
    )
    # One value per epoch, as the reference's np.linspace(0.04, 0.07, 2) then 0.07 for the other epochs
    temps = method.teacher_temps
    np.testing.assert_allclose(temps, [0.04, 0.07, 0.07, 0.07, 0.07], atol=1e-12)
    # The step reads its temperature from the schedule at its own epoch.
    views = make_views(method.view_recipe())
    method.train()
    for iteration in (0, 2, 3, 14):
        out = method.training_step(views, labels_for(), Step(iteration, iteration // 3, 3, 15))
        assert out.logs["teacher_temp"] == pytest.approx(temps[iteration // 3])
    assert out.logs["teacher_temp"] == pytest.approx(0.07)


def test_dino_out_dim_auto():
    torch.manual_seed(0)
    small = build("dino", "vit_tiny16", out_dim=None)
    assert small.config.out_dim == 4096
    assert small.head.last_layer.out_features == 4096 and small.center.shape == (1, 4096)
    assert small.resolved_options()["out_dim"] == 4096
    big = build("dino", "vit_tiny16", image_size=224, out_dim=None)
    assert big.config.out_dim == 65536
    assert big.teacher_head.last_layer.out_features == 65536
    assert build("dino", "vit_tiny16", out_dim=128).config.out_dim == 128  # an explicit value is kept


def test_dino_teacher_has_no_stochastic_depth():
    torch.manual_seed(0)
    method = build("dino", "vit_tiny16", drop_path_rate=0.1)
    student = [m.drop_prob for m in method.backbone.modules() if hasattr(m, "drop_prob")]
    teacher = [m.drop_prob for m in method.teacher_backbone.modules() if hasattr(m, "drop_prob")]
    assert student and max(student) == pytest.approx(0.1) and all(p > 0 for p in student)
    assert len(teacher) == len(student) and all(p == 0 for p in teacher)
    # In train mode the teacher is deterministic, the student is not.
    method.train()
    x = torch.randn(8, 3, SIZE, SIZE)  # 8 samples: two equal drop patterns in the student are ~1e-4 likely
    with torch.no_grad():
        assert torch.equal(method.teacher_backbone(x), method.teacher_backbone(x))
        assert not torch.equal(method.backbone(x), method.backbone(x))


# --------------------------------------------------------------------------------------------------------
# SimCLR, BYOL, supervised
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image_size", "expected"), [(32, 0.5), (64, 0.5), (128, 0.1), (224, 0.1)])
def test_simclr_temperature_auto(image_size, expected):
    method_cls = get_method("simclr")
    backbone = create_backbone("resnet18", SIZE)
    context = TrainContext(1, 1, NUM_CLASSES, image_size)
    method = method_cls(backbone, small_config(method_cls, temperature=None), context)
    assert method.config.temperature == expected
    explicit = method_cls(backbone, small_config(method_cls, temperature=0.2), context)
    assert explicit.config.temperature == 0.2


def test_byol_target_starts_from_its_own_draw_unless_copied():
    """The reference initialises the target from its own seed (byol_experiment.py, rng_target)."""
    for target_init, same in (("independent", False), ("copy", True)):
        torch.manual_seed(0)
        byol = build("byol", target_init=target_init)
        for online, target in byol.momentum_pairs():
            pairs = list(zip(online.parameters(), target.parameters(), strict=True))
            assert all(torch.equal(a, b) for a, b in pairs) is same
            assert all(not torch.equal(a, b) for a, b in pairs if a.numel() > 1 and a.std() > 0) is not same
    with pytest.raises(SSLBenchError, match="byol.target_init must be one of independent, copy"):
        get_method("byol").Config(target_init="clone")


def test_byol_loss_is_symmetrised():
    torch.manual_seed(0)
    method = build("byol", "resnet18")
    views = make_views(method.view_recipe())
    method.eval()  # BatchNorm on running statistics: each sample's output is independent of its batch
    step = Step(0, 0, 1, 1)
    with torch.no_grad():
        loss = method.training_step(views, labels_for(), step).loss
        swapped = method.training_step(views[::-1], labels_for(), step).loss
        p1, p2 = (method.predictor(method.projector(method.backbone(v))) for v in views)
        t1, t2 = (method.target_projector(method.target_backbone(v)) for v in views)

    def one_way(p, z):  # Eq. 2 of the paper
        return (2 - 2 * F.cosine_similarity(p, z, dim=-1)).mean()

    torch.testing.assert_close(swapped, loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, one_way(p1, t2) + one_way(p2, t1), rtol=0, atol=1e-5)
    assert loss > byol_loss(p1, t2) + 1e-3  # both directions, not one


def test_supervised_uses_labels():
    torch.manual_seed(0)
    method = build("supervised", "resnet18")
    views = make_views(method.view_recipe())
    labels = torch.tensor([3, 1, 4, 1])
    method.eval()
    step = Step(0, 0, 1, 1)
    with torch.no_grad():
        loss = method.training_step(views, labels, step).loss
        other = method.training_step(views, (labels + 1) % NUM_CLASSES, step).loss
        logits = [method.classifier(method.backbone(v)) for v in views]
    reference = (F.cross_entropy(logits[0], labels) + F.cross_entropy(logits[1], labels)) / 2
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-5)
    assert not torch.isclose(loss, other)
    assert method.classifier.out_features == NUM_CLASSES
