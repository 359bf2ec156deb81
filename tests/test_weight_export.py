"""Exported backbones load in timm and torchvision by exactly the code the export hands back, and give
sslbench's own features: equal where the same code runs, close for torchvision's ViT; the documented
variants and the refusals hold too."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from scrambled_weights import scrambled as _scrambled
from torch import Tensor, nn

from sslbench import SSLBenchError
from sslbench.models.backbones import ARCHS, Backbone, create_backbone
from sslbench.models.weight_export import (
    CIFAR_STEM_LINES,
    FORMATS,
    export_backbone,
    timm_model_kwargs,
)
from sslbench.models.weight_formats import load_backbone_weights

SOURCES = (("vit_tiny16", 32), ("resnet18", 32), ("vit_tiny16", 28), ("vit_tiny16", 224), ("resnet18", 96))
CASES = [
    ("timm", "vit_tiny16", 32),
    ("timm", "resnet18", 32),  # CIFAR stem: the two stem lines, then load_checkpoint
    ("timm", "vit_tiny16", 28),  # no whole number of patches: padded, positions resampled in the file
    ("timm", "vit_tiny16", 224),
    ("timm", "resnet18", 96),  # ImageNet stem: local-dir
    ("torchvision", "vit_tiny16", 32),
    ("torchvision", "resnet18", 32),
    ("torchvision", "resnet18", 96),
    ("safetensors", "vit_tiny16", 32),
    ("safetensors", "resnet18", 32),
]


@pytest.fixture(scope="module")
def sources() -> dict[tuple[str, int], tuple[Backbone, Tensor, Tensor]]:
    """(arch, image size) -> a random backbone, two images of that size, and their ``knn`` features."""
    out = {}
    for index, (arch, size) in enumerate(SOURCES):
        torch.manual_seed(index)
        backbone = _scrambled(create_backbone(arch, size), seed=index)
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(index))
        with torch.no_grad():
            out[arch, size] = backbone, images, backbone.forward_eval(images)["knn"]
    return out


def _run(code: str) -> nn.Module:
    """The export's load code, run as a user would paste it."""
    namespace: dict = {}
    exec(code, namespace)
    return namespace["model"].eval()


def _features(model: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize(("fmt", "arch", "size"), CASES, ids=[f"{f}-{a}-{s}" for f, a, s in CASES])
def test_each_export_loads_by_its_code_and_gives_sslbenchs_features(sources, fmt, arch, size, tmp_path: Path):
    backbone, images, expected = sources[arch, size]
    exported = export_backbone(backbone.state_dict(), arch, size, tmp_path / "out", fmt)
    assert exported.format == fmt and [path.name for path in exported.files] == list(FORMATS[fmt])
    assert all(path.is_file() for path in exported.files)
    features = _features(_run(exported.load_code), images)
    if fmt == "torchvision" and arch.startswith("vit"):  # torchvision's own attention: the same maths
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(features, expected)
    assert exported.notes[0] == "load with: " + "; ".join(exported.load_code.splitlines()[1:])
    assert exported.timm_name == (None if fmt == "torchvision" else ARCHS[arch].timm_name)
    # the folder keeps the same recipe, with the folder's place left open
    record = json.loads(exported.files[1].read_text())
    lines = record["sslbench"]["load"] if fmt == "timm" else record["load"]
    folder = str((tmp_path / "out").resolve())
    assert "\n".join(lines).replace("<this folder>", folder) == exported.load_code
    assert record.get("sslbench", record)["image_size"] == size


def test_timm_without_config_by_the_overlay_and_its_num_classes_keeps_the_load_strict(
    sources, tmp_path: Path
):
    backbone, images, expected = sources["vit_tiny16", 32]
    exported = export_backbone(backbone.state_dict(), "vit_tiny16", 32, tmp_path, "timm")
    assert "pretrained_cfg_overlay=dict(file=<model.safetensors>, num_classes=0)" in " ".join(exported.notes)

    def create(file: Path, **overlay) -> nn.Module:
        return timm.create_model(
            exported.timm_name,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(file), **overlay),
            num_classes=0,
            **exported.model_kwargs,
        ).eval()

    assert torch.equal(_features(create(exported.files[0], num_classes=0), images), expected)
    broken = load_file(str(exported.files[0]))
    del broken["blocks.11.mlp.fc2.bias"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(RuntimeError, match="blocks.11.mlp.fc2.bias"):
        create(tmp_path / "broken.safetensors", num_classes=0)
    create(
        tmp_path / "broken.safetensors"
    )  # why the overlay says num_classes=0: else timm loads non-strictly


def test_cifar_stem_is_built_before_loading_because_timm_has_no_argument_for_it(sources, tmp_path: Path):
    backbone, images, expected = sources["resnet18", 32]
    exported = export_backbone(backbone.state_dict(), "resnet18", 32, tmp_path, "timm")
    assert all(line in exported.load_code.splitlines() for line in CIFAR_STEM_LINES)
    assert exported.model_kwargs == {} and "CIFAR stem" in " ".join(exported.notes)
    with pytest.raises(RuntimeError, match="conv1.weight"):  # loading first meets the 7x7 stem
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    torchvision_export = export_backbone(backbone.state_dict(), "resnet18", 32, tmp_path, "torchvision")
    assert torchvision_export.load_code.splitlines()[2:4] == list(CIFAR_STEM_LINES)


@pytest.mark.parametrize(("size", "resized_to"), [(96, 110), (224, 256), (32, 32)])
def test_timm_config_carries_sslbenchs_eval_preprocessing(size: int, resized_to: int, tmp_path: Path):
    state = create_backbone("resnet18", size).state_dict()
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    export_backbone(state, "resnet18", size, tmp_path, "timm", mean=mean, std=std)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 0
    assert config["num_features"] == 512 and config["sslbench"]["stem"] == (
        "cifar" if size <= 64 else "imagenet"
    )
    data = config["pretrained_cfg"]
    assert data["input_size"] == [3, size, size] and data["interpolation"] == "bicubic"
    assert math.floor(size / data["crop_pct"]) == resized_to  # timm's resize: sslbench's eval resize
    assert data["mean"] == pytest.approx(mean) and data["std"] == pytest.approx(std)
    without = export_backbone(state, "resnet18", size, tmp_path / "plain", "timm")
    assert "mean" not in json.loads((tmp_path / "plain" / "config.json").read_text())["pretrained_cfg"]
    assert any(note.startswith("mean/std not recorded") for note in without.notes)


def test_small_vit_config_rebuilds_the_grid(sources, tmp_path: Path):
    backbone, _, _ = sources["vit_tiny16", 32]
    exported = export_backbone(backbone.state_dict(), "vit_tiny16", 32, tmp_path, "timm")
    assert exported.model_kwargs == {"img_size": 32, "patch_size": 4}
    assert json.loads((tmp_path / "config.json").read_text())["model_args"] == exported.model_kwargs
    assert timm_model_kwargs("vit_tiny16", 28) == {
        "img_size": 30,
        "patch_size": 3,
        "dynamic_img_size": True,
        "dynamic_img_pad": True,
    }


@pytest.mark.parametrize(("fmt", "arch"), [("safetensors", "vit_tiny16"), ("torchvision", "vit_tiny16")])
def test_sslbench_reads_its_exports_back(sources, fmt: str, arch: str, tmp_path: Path):
    backbone, images, _ = sources[arch, 32]
    exported = export_backbone(backbone.state_dict(), arch, 32, tmp_path, fmt)
    reloaded = create_backbone(arch, 32).eval()
    loaded = load_backbone_weights(str(exported.files[0]), reloaded)
    assert not (loaded.missing or loaded.unexpected or loaded.mismatched)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.forward_eval(images), backbone.forward_eval(images), rtol=0, atol=0
        )


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_stock_timm_with_the_exported_kwargs_has_every_key_and_shape(arch: str):
    """Every registered arch, on the meta device (no memory): stock timm, given the export's kwargs and the
    stem lines, has exactly the keys and shapes of sslbench's network (the padded grid's positions aside)."""
    for size in (32, 28, 224):
        with torch.device("meta"):
            reference = create_backbone(arch, size).model.state_dict()
            model = timm.create_model(ARCHS[arch].timm_name, num_classes=0, **timm_model_kwargs(arch, size))
            if ARCHS[arch].family == "resnet" and size <= 64:
                exec("\n".join(CIFAR_STEM_LINES), {"torch": torch, "model": model})
        stock = model.state_dict()
        assert list(stock) == list(reference), (arch, size)
        differ = [key for key in reference if stock[key].shape != reference[key].shape]
        assert differ == (["pos_embed"] if arch.startswith("vit") and size == 28 else []), (arch, size)


def _error(call) -> str:
    with pytest.raises(SSLBenchError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_refusals_are_one_line_with_the_valid_choices(sources, tmp_path: Path):
    vit_state = sources["vit_tiny16", 32][0].state_dict()
    resnet_state = sources["resnet18", 96][0].state_dict()
    message = _error(lambda: export_backbone(vit_state, "vit_tiny16", 32, tmp_path, "onnx"))
    assert "unknown format 'onnx'" in message and "safetensors, timm, torchvision" in message
    message = _error(lambda: export_backbone(vit_state, "vit_tiny61", 32, tmp_path, "timm"))
    assert "did you mean 'vit_tiny16'" in message and "resnet18" in message
    padded_state = sources["vit_tiny16", 28][0].state_dict()
    message = _error(lambda: export_backbone(padded_state, "vit_tiny16", 28, tmp_path, "torchvision"))
    assert "not a multiple of patch 3" in message and message.endswith("safetensors, timm")
    message = _error(lambda: export_backbone(resnet_state, "vit_tiny16", 32, tmp_path, "timm"))
    assert "not a vit_tiny16 backbone at 32 px" in message and "missing: cls_token" in message
    message = _error(lambda: export_backbone(resnet_state, "resnet18", 32, tmp_path, "timm"))
    assert "shapes differ: conv1.weight (64, 3, 7, 7) (wanted (64, 3, 3, 3))" in message
    message = _error(lambda: export_backbone(vit_state, "vit_tiny16", 0, tmp_path, "timm"))
    assert "image_size must be a whole number of pixels" in message
    message = _error(lambda: export_backbone(vit_state, "vit_tiny16", 32, tmp_path, "timm", mean=(0.5,) * 3))
    assert "mean and std go together" in message
    assert not any(tmp_path.iterdir())  # nothing written by a refusal


def test_existing_files_are_replaced_only_when_asked(sources, tmp_path: Path):
    first, images, expected = sources["vit_tiny16", 32]
    second = _scrambled(create_backbone("vit_tiny16", 32), seed=99)
    export_backbone(first.state_dict(), "vit_tiny16", 32, tmp_path, "timm")
    export_backbone(first.state_dict(), "vit_tiny16", 32, tmp_path, "safetensors")  # other names: fine
    message = _error(lambda: export_backbone(second.state_dict(), "vit_tiny16", 32, tmp_path, "timm"))
    assert "already holds model.safetensors, config.json" in message and "overwrite=True" in message
    assert torch.equal(_features(_run(_load_code(tmp_path)), images), expected)  # untouched
    exported = export_backbone(second.state_dict(), "vit_tiny16", 32, tmp_path, "timm", overwrite=True)
    with torch.no_grad():
        assert torch.equal(_features(_run(exported.load_code), images), second.forward_eval(images)["knn"])


def _load_code(folder: Path) -> str:
    lines = json.loads((folder / "config.json").read_text())["sslbench"]["load"]
    return "\n".join(lines).replace("<this folder>", str(folder.resolve()))
