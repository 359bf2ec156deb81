"""The presets' values: quick and cifar10 as documented, and the imagenet presets as the DINO README's
commands on main_dino.py's argparse defaults."""

from __future__ import annotations

import pytest

from sslbench.config import build_dataclass, load_preset, resolve_config
from sslbench.method.registry import get_method, list_methods


def test_preset_values() -> None:
    names = list(list_methods())
    quick = resolve_config([load_preset("quick")], names)
    assert (quick.train.epochs, quick.train.batch_size, quick.train.train_per_class) == (2, 32, 60)
    assert (quick.eval.train_per_class, quick.eval.test_per_class) == (100, 50)
    assert quick.method_options["dino"] == {"out_dim": 1024, "local_crops_number": 2}
    cifar = resolve_config([load_preset("cifar10")], names)
    assert (cifar.dataset, cifar.train.epochs, cifar.train.batch_size) == ("cifar10", 200, 256)


# main_dino.py's argparse defaults (facebookresearch/dino), and the README's two ViT-S/16 commands on them.
MAIN_DINO_DEFAULTS = {
    "out_dim": 65536, "norm_last_layer": True, "momentum_teacher": 0.996, "warmup_teacher_temp": 0.04,
    "teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0, "weight_decay": 0.04, "weight_decay_end": 0.4,
    "clip_grad": 3.0, "batch_size_per_gpu": 64, "epochs": 100, "freeze_last_layer": 1, "lr": 0.0005,
    "warmup_epochs": 10, "min_lr": 1e-6, "optimizer": "adamw", "drop_path_rate": 0.1,
    "global_crops_scale": (0.4, 1.0), "local_crops_number": 8, "local_crops_scale": (0.05, 0.4),
    "num_workers": 10, "seed": 0,
}  # fmt: skip
README_COMMANDS = {
    "imagenet": MAIN_DINO_DEFAULTS | {"gpus": 8},  # main_dino.py --arch vit_small, one node of 8
    "imagenet-boost": MAIN_DINO_DEFAULTS  # run_with_submitit.py: 2 nodes x 8 GPUs by default
    | {
        "epochs": 300,
        "teacher_temp": 0.07,
        "warmup_teacher_temp_epochs": 30,
        "norm_last_layer": False,
        "gpus": 16,
    },
}


@pytest.mark.parametrize("preset", sorted(README_COMMANDS))
def test_imagenet_presets_are_the_reference_commands(preset: str) -> None:
    args = README_COMMANDS[preset]
    config = resolve_config([load_preset(preset)], list(list_methods()))
    train = config.train
    assert (config.image_size, config.archs, config.seed) == (224, ["vit_s16"], args["seed"])
    assert train.batch_size == args["batch_size_per_gpu"] * args["gpus"]
    ours = {
        "epochs": train.epochs, "optimizer": train.optimizer, "lr": train.lr, "min_lr": train.min_lr,
        "warmup_epochs": train.warmup_epochs, "weight_decay": train.weight_decay,
        "weight_decay_end": train.weight_decay_end, "momentum_teacher": train.ema_momentum,
        "clip_grad": train.clip_grad, "drop_path_rate": train.drop_path_rate,
        "num_workers": train.num_workers,
    }  # fmt: skip
    assert ours == {key: args[key] for key in ours}
    assert train.ema_momentum_end == 1.0
    dino = build_dataclass(get_method("dino").Config, config.method_options["dino"], "dino")
    same_names = ["out_dim", "norm_last_layer", "local_crops_number", "warmup_teacher_temp", "teacher_temp"]
    for key in [*same_names, "warmup_teacher_temp_epochs"]:
        assert getattr(dino, key) == args[key], key
    assert dino.freeze_last_layer_epochs == args["freeze_last_layer"]
    assert tuple(dino.global_crops_scale) == args["global_crops_scale"]
    assert tuple(dino.local_crops_scale) == args["local_crops_scale"]
