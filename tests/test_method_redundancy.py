"""Barlow Twins and VICReg: what each method promises beyond the generic contract of tests/test_methods.py.

- the projector has the reference's layers (facebookresearch/barlowtwins ``BarlowTwins.__init__``,
  facebookresearch/vicreg ``Projector``), with widths resolved from the image size and recorded;
- the step's loss is the shared loss on the two views' projections, each view through the networks on
  its own (per-view BatchNorm, as both references);
- a collapsed projector (every output equal) gives the loss terms the papers' equations give;
- the published recipes, the views and the evaluated network.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from sslbench import Method, SSLBenchError, Step, TrainContext, create_backbone, get_method
from sslbench.data.augment import build_view_transform
from sslbench.losses import barlow_twins_loss, vicreg_loss

SIZE = 32
NAMES = ("barlow_twins", "vicreg")
SMALL = {"proj_hidden_dim": 64, "proj_dim": 32}
HIDDEN_BIAS = {"barlow_twins": False, "vicreg": True}  # Barlow Twins: bias=False; VICReg: nn.Linear's default


def build(name: str, image_size: int = SIZE, arch: str = "resnet18", **options) -> Method:
    method_cls = get_method(name)
    backbone = create_backbone(arch, image_size)
    return method_cls(backbone, method_cls.Config(**options), TrainContext(2, 1, 10, image_size))


def make_views(method: Method, n: int = 8) -> list[Tensor]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]
    transform = build_view_transform(method.view_recipe(), SIZE, (0.5,) * 3, (0.25,) * 3)
    per_image = [transform(image) for image in images]
    return [torch.stack(views) for views in zip(*per_image, strict=True)]


def shared_loss(method: Method, z1: Tensor, z2: Tensor) -> Tensor:
    cfg = method.config
    if method.name == "barlow_twins":
        return barlow_twins_loss(z1, z2, cfg.lambda_offdiag)
    return vicreg_loss(z1, z2, cfg.sim_coeff, cfg.std_coeff, cfg.cov_coeff, cfg.eps)


# --------------------------------------------------------------------------------------------------------
# Projector structure
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("image_size", "width"), [(32, 2048), (64, 2048), (96, 8192), (224, 8192)])
def test_projector_layers_and_widths_resolved_from_the_image_size(name, image_size, width):
    with torch.device("meta"):  # the 8192-wide heads, without allocating them
        method = build(name, image_size)
    layers = list(method.projector.mlp)
    assert [type(layer) for layer in layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    linears = [layer for layer in layers if isinstance(layer, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [
        (512, width),
        (width, width),
        (width, width),
    ]
    assert [lin.bias is not None for lin in linears] == [HIDDEN_BIAS[name]] * 2 + [False]
    norms = [layer for layer in layers if isinstance(layer, nn.BatchNorm1d)]
    assert all(bn.affine and bn.num_features == width for bn in norms)
    options = method.resolved_options()
    assert options["proj_hidden_dim"] == width and options["proj_dim"] == width  # recorded as used


@pytest.mark.parametrize("name", NAMES)
def test_explicit_sizes_are_kept(name):
    method = build(name, proj_hidden_dim=48, proj_dim=24, proj_layers=2)
    linears = [layer for layer in method.projector.mlp if isinstance(layer, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(512, 48), (48, 24)]
    assert method.resolved_options()["proj_hidden_dim"] == 48


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        ("barlow_twins", "proj_dim", 0),
        ("barlow_twins", "proj_layers", 0),
        ("barlow_twins", "lambda_offdiag", -0.1),
        ("vicreg", "proj_hidden_dim", -1),
        ("vicreg", "std_coeff", -1.0),
        ("vicreg", "eps", 0.0),
    ],
)
def test_bad_options_are_refused(name, field, value):
    with pytest.raises(SSLBenchError, match=f"{name}.{field} must be"):
        get_method(name).Config(**{field: value})


# --------------------------------------------------------------------------------------------------------
# The training step
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_step_loss_is_the_shared_loss_of_per_view_projections(name, monkeypatch):
    torch.manual_seed(0)
    method = build(name, **SMALL)
    method.train()
    views = make_views(method)
    module = importlib.import_module(type(method).__module__)
    loss_name = "barlow_twins_loss" if name == "barlow_twins" else "vicreg_loss"
    shared = getattr(module, loss_name)
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return shared(*args, **kwargs)

    monkeypatch.setattr(module, loss_name, spy)
    with torch.no_grad():
        output = method.training_step(views, torch.zeros(8, dtype=torch.long), Step(0, 0, 1, 1))
        z1, z2 = (method.projector(method.backbone(v)) for v in views)  # each view on its own
        batched = method.projector(method.backbone(torch.cat(views))).chunk(2)
    assert len(calls) == 1  # the shared function, once, on the two projections
    torch.testing.assert_close(calls[0][0][0], z1, rtol=0, atol=0)
    torch.testing.assert_close(calls[0][0][1], z2, rtol=0, atol=0)
    torch.testing.assert_close(output.loss, shared_loss(method, z1, z2), rtol=0, atol=0)
    torch.testing.assert_close(output.embeddings, torch.cat([z1, z2]), rtol=0, atol=0)
    # BatchNorm statistics are per view: both views in one batch would give another loss
    assert not torch.isclose(output.loss, shared_loss(method, *batched))


def _collapse(method: Method) -> None:
    """Every projection equal (zero): the last Linear of the projector, which has no bias, zeroed."""
    with torch.no_grad():
        method.projector.mlp[-1].weight.zero_()


def test_barlow_twins_collapsed_projector():
    """C = 0 (standardised constant columns are 0): L = sum_i (1 - 0)^2 = D, no redundancy term."""
    torch.manual_seed(0)
    method = build("barlow_twins", **SMALL)
    method.train()
    _collapse(method)
    views = make_views(method)
    output = method.training_step(views, torch.zeros(8, dtype=torch.long), Step(0, 0, 1, 1, diagnose=True))
    assert torch.count_nonzero(output.embeddings) == 0
    assert output.loss.item() == pytest.approx(SMALL["proj_dim"], abs=1e-6)
    assert output.logs["invariance"].item() == pytest.approx(SMALL["proj_dim"], abs=1e-6)
    assert output.logs["redundancy"].item() == pytest.approx(0.0, abs=1e-9)


def test_vicreg_collapsed_projector():
    """std = sqrt(0 + eps) = 0.01 in every dimension: variance hinge 1 - 0.01 = 0.99 per view, averaged over
    the two views (the reference's halving), weighted 25: the loss is 24.75; invariance and covariance 0."""
    torch.manual_seed(0)
    method = build("vicreg", **SMALL)
    method.train()
    _collapse(method)
    views = make_views(method)
    output = method.training_step(views, torch.zeros(8, dtype=torch.long), Step(0, 0, 1, 1, diagnose=True))
    variance = 1 - math.sqrt(1e-4)
    assert output.loss.item() == pytest.approx(25 * variance, abs=1e-5)
    assert output.logs["variance"].item() == pytest.approx(variance, abs=1e-6)
    assert output.logs["invariance"].item() == 0.0
    assert output.logs["covariance"].item() == 0.0


def test_vicreg_logged_terms_recompose_the_loss():
    torch.manual_seed(0)
    method = build("vicreg", **SMALL)
    method.train()
    views = make_views(method)
    with torch.no_grad():
        output = method.training_step(
            views, torch.zeros(8, dtype=torch.long), Step(0, 0, 1, 1, diagnose=True)
        )
    logs = output.logs
    recomposed = 25 * logs["invariance"] + 25 * logs["variance"] + logs["covariance"]
    torch.testing.assert_close(recomposed, output.loss, rtol=1e-5, atol=1e-5)
    z1, z2 = output.embeddings.chunk(2)
    torch.testing.assert_close(logs["invariance"], F.mse_loss(z1, z2), rtol=1e-6, atol=1e-7)
    quiet = method.training_step(views, torch.zeros(8, dtype=torch.long), Step(0, 0, 1, 1))
    assert quiet.logs == {}  # the extra terms only on the iterations the runner logs


# --------------------------------------------------------------------------------------------------------
# Views, evaluation, recipes
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_views_evaluation_and_no_teacher(name):
    method = build(name, **SMALL)
    recipe = method.view_recipe()
    assert recipe.kind == "asymmetric" and recipe.num_views == 2  # blur 1.0 / 0.1, solarise 0 / 0.2
    assert recipe.global_scale == (0.08, 1.0)  # RandomResizedCrop's default scale, as both references
    assert method.eval_backbone() is method.backbone
    assert method.momentum_pairs() == [] and method.parameter_rules() == []


def test_barlow_twins_paper_recipe():
    method_cls = get_method("barlow_twins")
    assert method_cls.paper_recipe("vit", 224, 100) is None
    for size, epochs in ((32, 2), (224, 1000)):
        train = method_cls.paper_recipe("resnet", size, epochs).train
        assert train["optimizer"] == "lars" and train["lr"] == 0.2
        assert train["min_lr"] == pytest.approx(0.001 * 0.2 * 2048 / 256)  # adjust_learning_rate's end
        assert train["weight_decay"] == train["weight_decay_end"] == 1e-6  # main.py's --weight-decay
        assert (train["warmup_epochs"], train["momentum"], train["clip_grad"]) == (10, 0.9, 0.0)


@pytest.mark.parametrize(("epochs", "lr", "batch"), [(2, 0.3, 512), (100, 0.3, 512), (800, 0.2, 2048)])
def test_vicreg_paper_recipe(epochs, lr, batch):
    method_cls = get_method("vicreg")
    assert method_cls.paper_recipe("vit", 224, epochs) is None
    recipe = method_cls.paper_recipe("resnet", 224, epochs)
    train = recipe.train
    assert train["optimizer"] == "lars" and train["lr"] == lr
    assert train["min_lr"] == pytest.approx(0.001 * lr * batch / 256)
    assert train["weight_decay"] == train["weight_decay_end"] == 1e-6
    assert (train["warmup_epochs"], train["momentum"], train["clip_grad"]) == (10, 0.9, 0.0)
    assert f"--base-lr {lr}" in recipe.source
