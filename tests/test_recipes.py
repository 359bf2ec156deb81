"""``--recipe paper``: every registered method's published recipes are complete and applied as a whole;
then each built-in recipe against the reference it transcribes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sslbench.config import RunConfig, TrainConfig
from sslbench.method.recipes import RECIPE_TRAIN_KEYS, PaperRecipe, nearest_epochs
from sslbench.method.registry import get_method, list_methods
from sslbench.models.backbones import ARCHS
from sslbench.training.runner import plan_pair

METHODS = sorted(list_methods())
CPU = torch.device("cpu")
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
CASES = [
    (arch, size, epochs) for arch in ("resnet18", "vit_tiny16") for size in (32, 224) for epochs in (2, 300)
]


def _another(value: object) -> object:
    """A valid value of the same type that differs from ``value``, as a user might set it."""
    if isinstance(value, tuple):
        return tuple(x / 2 for x in value)
    return value / 2 if isinstance(value, float) else value


@pytest.mark.parametrize("name", METHODS)
def test_every_recipe_is_complete_and_replaces_what_the_user_set(name):
    method_cls = get_method(name)
    option_fields = {f.name for f in dataclasses.fields(method_cls.Config)}
    for arch, size, epochs in CASES:
        published = method_cls.paper_recipe(ARCHS[arch].family, size, epochs)
        # Whatever the preset and flags set on the keys a recipe owns, the recipe wins
        user_train = dataclasses.replace(TrainConfig(), epochs=epochs, lr=123.0, min_lr=7.0, clip_grad=9.0)
        user_options = {
            key: _another(value) for key, value in (published.options if published else {}).items()
        }
        config = RunConfig(recipe="paper", train=user_train)
        if published is None:
            planned = plan_pair(method_cls, arch, config, CPU, image_size=size)
            assert planned.recipe == "shared" and planned.train == user_train
            continue
        assert isinstance(published, PaperRecipe)
        assert set(RECIPE_TRAIN_KEYS) <= set(published.train) <= TRAIN_FIELDS
        assert set(published.options) <= option_fields
        config.method_options = {name: user_options}
        planned = plan_pair(method_cls, arch, config, CPU, image_size=size)
        assert planned.recipe.startswith(f"paper ({name}, {published.label}): ")
        assert published.source in planned.recipe
        for key, value in published.train.items():
            assert getattr(planned.train, key) == value, (name, arch, key)
        for key, value in published.options.items():
            assert getattr(planned.method_options, key) == value, (name, arch, key)
        assert planned.train.epochs == epochs  # the run keeps its scale
        shared = plan_pair(
            method_cls, arch, dataclasses.replace(config, recipe="shared"), CPU, image_size=size
        )
        assert shared.recipe == "shared" and shared.train == user_train


def test_a_recipe_missing_a_key_is_refused_when_written():
    with pytest.raises(ValueError, match="does not set clip_grad"):
        PaperRecipe("x", "y", train={key: 0 for key in RECIPE_TRAIN_KEYS if key != "clip_grad"})


def test_nearest_epochs_is_nearest_on_a_log_scale():
    published = {40: None, 100: None, 300: None, 1000: None}
    assert [nearest_epochs(e, published) for e in (1, 2, 63, 64, 100, 200, 500, 600, 5000)] == [
        40, 40, 40, 100, 100, 300, 300, 1000, 1000,
    ]  # fmt: skip


def test_dino_resnet_recipe_is_the_reference_readme_command():
    """``main_dino.py --arch resnet50 --optimizer sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4
    --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14``, the rest at main_dino.py's defaults."""
    planned = plan_pair(get_method("dino"), "resnet50", RunConfig(recipe="paper"), CPU, image_size=224)
    train = planned.train
    assert (train.optimizer, train.lr, train.min_lr, train.momentum) == ("sgd", 0.03, 1e-6, 0.9)
    assert (train.weight_decay, train.weight_decay_end, train.warmup_epochs) == (1e-4, 1e-4, 10)
    assert (train.clip_grad, train.ema_momentum, train.ema_momentum_end) == (3.0, 0.996, 1.0)
    options = planned.method_options
    assert tuple(options.global_crops_scale) == (0.14, 1.0)
    assert tuple(options.local_crops_scale) == (0.05, 0.14)
    vit = plan_pair(get_method("dino"), "vit_s16", RunConfig(recipe="paper"), CPU, image_size=224)
    assert (vit.train.optimizer, vit.train.lr, vit.train.weight_decay_end) == ("adamw", 5e-4, 0.4)
    assert tuple(vit.method_options.local_crops_scale) == (0.05, 0.4)


@pytest.mark.parametrize(
    ("epochs", "lr", "weight_decay", "ema", "length"),
    [
        (2, 0.45, 1e-6, 0.97, 40),
        (100, 0.45, 1e-6, 0.99, 100),
        (300, 0.3, 1e-6, 0.99, 300),
        (1000, 0.2, 1.5e-6, 0.996, 1000),
    ],
)
def test_byol_recipe_follows_the_run_length(epochs, lr, weight_decay, ema, length):
    """byol/configs/byol.py: _LR_PRESETS, _WD_PRESETS and _EMA_PRESETS, with a cosine to 0."""
    config = RunConfig(recipe="paper", train=TrainConfig(epochs=epochs))
    planned = plan_pair(get_method("byol"), "resnet50", config, CPU, image_size=224)
    train = planned.train
    assert (train.optimizer, train.lr, train.weight_decay, train.weight_decay_end) == (
        "lars", lr, weight_decay, weight_decay,
    )  # fmt: skip
    assert (train.ema_momentum, train.ema_momentum_end, train.min_lr, train.warmup_epochs) == (
        ema,
        1.0,
        0.0,
        10,
    )
    assert f"{length}-epoch values" in planned.recipe


def test_simclr_recipe_follows_the_resolution():
    """The v1 code (google-research/simclr at its first commit, whose numbers the paper reports): run.py's
    defaults at ImageNet scale, the README's CIFAR-10 command at 32 px."""
    config = RunConfig(recipe="paper")
    small = plan_pair(get_method("simclr"), "resnet18", config, CPU, image_size=32)
    large = plan_pair(get_method("simclr"), "resnet18", config, CPU, image_size=224)
    assert (small.train.optimizer, small.train.lr, small.train.weight_decay) == ("lars", 1.0, 1e-6)
    assert (large.train.optimizer, large.train.lr, large.train.weight_decay) == ("lars", 0.3, 1e-6)
    assert (small.method_options.temperature, large.method_options.temperature) == (0.5, 0.1)
    assert small.train.min_lr == large.train.min_lr == 0.0
    assert small.recipe.startswith("paper (simclr, resnet, CIFAR)")
    vit = plan_pair(get_method("simclr"), "vit_tiny16", config, CPU, image_size=32)
    assert vit.recipe == "shared"  # the papers trained ResNets only
