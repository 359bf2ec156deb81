"""Weights from other projects' files: every format's layout, written from a random sslbench backbone into
a file with a misleading name, is recognised from its keys, loads strictly into a backbone of another seed
and gives exactly the original's features; what does not fit is refused with the keys, or recorded."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from scrambled_weights import scrambled as _scrambled
from torch import Tensor, nn

from sslbench import SSLBenchError
from sslbench.models.backbones import Backbone, create_backbone
from sslbench.models.vit import resample_position_embeddings
from sslbench.models.weight_formats import LoadedWeights, detect_format, load_backbone_weights

Plain = dict[str, Tensor]
LIGHTLY_CHILDREN = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}


class Opaque:
    """An object no weights-only load may create."""


def _features(backbone: Backbone, images: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        return backbone.forward_eval(images)


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return all(torch.equal(a[key], b[key]) for key in ("knn", "linear"))


@pytest.fixture(scope="module")
def images() -> Tensor:
    """Smaller than the 32 px the backbones are built for (ViT positions resampled on the fly): fast."""
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sources(images: Tensor) -> dict[str, tuple[Backbone, dict[str, Tensor]]]:
    """A random resnet18 and vit_tiny16 at 32 px with their features."""
    out = {}
    for family, arch in (("resnet", "resnet18"), ("vit", "vit_tiny16")):
        backbone = _scrambled(create_backbone(arch, 32), seed=1)
        out[family] = (backbone, _features(backbone, images))
    return out


@pytest.fixture(scope="module")
def targets() -> dict[str, Backbone]:
    return {"resnet": create_backbone("resnet18", 32), "vit": create_backbone("vit_tiny16", 32)}


def _plain(backbone: Backbone) -> Plain:
    return {key.removeprefix("model."): value.clone() for key, value in backbone.state_dict().items()}


ROOT_KEYS = ("conv1.weight", "layer1.0.conv1.weight", "bn1.weight", "patch_embed.proj.weight", "cls_token")


def _other(plain: Plain, whole: bool = False) -> Plain:
    """Another network: the part a checkpoint must not be read by default. Only its root's keys unless
    ``whole`` (files stay small; reading it instead would fail strictly for the keys it lacks)."""
    return {k: v + 1 if v.is_floating_point() else v for k, v in plain.items() if whole or k in ROOT_KEYS}


def _prefixed(prefix: str, plain: Plain) -> Plain:
    return {prefix + key: value for key, value in plain.items()}


def _head(family: str) -> Plain:
    """The classifier / projector a backbone keeps where its classifier was (fc, head)."""
    if family == "resnet":
        return {"fc.weight": torch.zeros(10, 512)}
    return {"head.weight": torch.zeros(10, 192)}


def _dinov2(plain: Plain) -> Plain:
    """DINOv2's layout: blocks in 4 chunks of 3 (``blocks.<chunk>.<block>``), a mask token, no head."""
    out = {}
    for key, value in plain.items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 3}.{key.removeprefix('blocks.')}"
        out[key] = value
    return out | {"mask_token": torch.zeros(1, 192)}


def _lightly_resnet(plain: Plain) -> Plain:
    return {LIGHTLY_CHILDREN[k.split(".")[0]] + "." + k.split(".", 1)[1]: v for k, v in plain.items()}


def _sslbench_checkpoint(plain: Plain, family: str) -> dict[str, Any]:
    """sslbench's ``iter-N.pt`` of a DINO-like method: the evaluated teacher, and another student."""
    method = _prefixed("backbone.model.", _other(plain, whole=True))
    method |= _prefixed("teacher_backbone.model.", plain)
    method |= {"head.mlp.0.weight": torch.zeros(4, 4), "center": torch.zeros(1, 4)}
    return {"format": 1, "method": method, "optimizer": {"state": {}, "param_groups": []}, "iteration": 3}


def _byol_checkpoint(plain: Plain, family: str) -> dict[str, Any]:
    """sslbench's BYOL: no teacher, so the online backbone is the evaluated one."""
    method = _prefixed("backbone.model.", plain) | _prefixed("target_backbone.model.", _other(plain))
    return {"format": 1, "method": method | {"predictor.0.weight": torch.zeros(4, 4)}, "iteration": 3}


def _dino_checkpoint(plain: Plain, family: str) -> dict[str, Any]:
    """main_dino.py's save_dict: DDP wraps the student always, the teacher only with BatchNorm."""
    student = _prefixed("module.backbone.", _other(plain)) | {
        "module.head.last_layer.weight_g": torch.ones(3)
    }
    teacher = _prefixed("module.backbone." if family == "resnet" else "backbone.", plain)
    return {
        "student": student,
        "teacher": teacher | {"head.mlp.0.weight": torch.zeros(3)},
        "epoch": 2,
        "args": argparse.Namespace(arch="vit_small", patch_size=16),
        "dino_loss": {"center": torch.zeros(1, 8)},
    }


def _moco_v3(plain: Plain, family: str) -> dict[str, Any]:
    """main_moco.py's checkpoint: the projector replaces the classifier (fc / head) of both encoders."""
    projector = {key.replace(".", ".0.", 1): value for key, value in _head(family).items()}
    weights = _prefixed("module.base_encoder.", plain | projector)
    weights |= _prefixed("module.momentum_encoder.", _other(plain))
    weights |= {"module.predictor.0.weight": torch.zeros(4, 4)}
    return {"epoch": 100, "arch": "vit_small", "state_dict": weights, "optimizer": {"state": {}}}


def _ibot_checkpoint(plain: Plain, family: str) -> dict[str, Any]:
    """main_ibot.py's save_dict: the student's ViT has the mask token, the heads a patch layer."""
    student = _prefixed("module.backbone.", _other(plain) | {"masked_embed": torch.zeros(1, 192)})
    return {
        "student": student,
        "teacher": _prefixed("backbone.", plain) | {"head.last_layer2.weight": torch.zeros(3)},
        "ibot_loss": {"center": torch.zeros(1, 8)},
        "args": argparse.Namespace(arch="vit_small"),
    }


def _dinov2_teacher(plain: Plain, family: str) -> dict[str, Any]:
    """train.py's do_test: ``teacher_checkpoint.pth`` of the teacher's backbone and heads."""
    return {"teacher": _prefixed("backbone.", _dinov2(plain)) | {"dino_head.mlp.0.weight": torch.zeros(3)}}


def _solo_learn(plain: Plain, family: str) -> dict[str, Any]:
    weights = _prefixed("backbone.", plain) | _prefixed("momentum_backbone.", _other(plain))
    weights |= {"projector.0.weight": torch.zeros(4, 4), "classifier.weight": torch.zeros(10, 4)}
    return {"state_dict": weights, "pytorch-lightning_version": "2.1.0", "global_step": 10}


def _lightly_resnet_checkpoint(plain: Plain, family: str) -> dict[str, Any]:
    weights = _prefixed("backbone.", _lightly_resnet(plain))
    weights |= _prefixed("backbone_momentum.", _lightly_resnet(_other(plain)))
    weights |= {"projection_head.layers.0.weight": torch.zeros(4, 4)}
    return {"state_dict": weights, "pytorch-lightning_version": "2.1.0"}


def _lightly_vit_checkpoint(plain: Plain, family: str) -> dict[str, Any]:
    """lightly's DINO / iBOT examples: MaskedVisionTransformerTIMM keeps the ViT in ``.vit``."""
    weights = _prefixed("student_backbone.vit.", _other(plain)) | _prefixed("teacher_backbone.vit.", plain)
    weights |= {"teacher_backbone.mask_token": torch.zeros(1, 1, 192), "student_head.w": torch.zeros(3)}
    return {"state_dict": weights}


Layout = Callable[[Plain, str], dict[str, Any]]
# (name, layout writer, families, format, part read by default)
LAYOUTS: list[tuple[str, Layout, tuple[str, ...], str, str | None]] = [
    ("sslbench backbone.pt", lambda p, f: _prefixed("model.", p), ("vit",), "sslbench backbone.pt", None),
    ("sslbench DINO", _sslbench_checkpoint, ("vit",), "sslbench checkpoint", "teacher"),
    ("sslbench BYOL", _byol_checkpoint, ("resnet",), "sslbench checkpoint", "backbone"),
    ("DINO checkpoint", _dino_checkpoint, ("resnet", "vit"), "DINO checkpoint", "teacher"),
    ("DINO backbone", lambda p, f: p, ("vit",), "DINO backbone", None),
    ("torchvision ResNet", lambda p, f: p | _head(f), ("resnet",), "torchvision/timm ResNet", None),
    ("timm state dict", lambda p, f: p | _head(f), ("vit",), "timm state dict", None),
    ("DDP, compiled", lambda p, f: _prefixed("module._orig_mod.", p), ("vit",), "DINO backbone", None),
    ("MoCo v3", _moco_v3, ("resnet", "vit"), "MoCo v3", "base_encoder"),
    ("iBOT checkpoint", _ibot_checkpoint, ("vit",), "iBOT", "teacher"),
    ("iBOT backbone", lambda p, f: {"state_dict": p}, ("vit",), "iBOT", None),
    ("DINOv2 backbone", lambda p, f: _dinov2(p), ("vit",), "DINOv2", None),
    ("DINOv2 teacher", _dinov2_teacher, ("vit",), "DINOv2", "teacher"),
    ("solo-learn", _solo_learn, ("vit",), "solo-learn", "backbone"),
    ("lightly ResNet", _lightly_resnet_checkpoint, ("resnet",), "lightly", "backbone"),
    ("lightly ViT", _lightly_vit_checkpoint, ("vit",), "lightly", "teacher_backbone"),
]
CASES = [(write, family, fmt, part) for _, write, families, fmt, part in LAYOUTS for family in families]
CASE_IDS = [f"{name}-{family}" for name, _, families, _, _ in LAYOUTS for family in families]


@pytest.mark.parametrize(("write", "family", "format_name", "default_part"), CASES, ids=CASE_IDS)
def test_each_layout_loads_strictly_and_gives_the_same_features(
    write, family, format_name, default_part, sources, targets, images, tmp_path: Path
):
    source, expected = sources[family]
    payload = write(_plain(source), family)
    path = tmp_path / "resnet50_supervised.pth"  # the name says nothing true: only the keys count
    torch.save(payload, path)
    assert detect_format(payload) == format_name
    target = _scrambled(targets[family], seed=7)
    original = source.state_dict()
    floats = {key: value for key, value in target.state_dict().items() if value.is_floating_point()}
    assert not any(torch.equal(value, original[key]) for key, value in floats.items())
    loaded = load_backbone_weights(str(path), target)
    assert (loaded.format, loaded.part) == (format_name, default_part)
    assert loaded.missing == loaded.unexpected == loaded.mismatched == [] and not loaded.partial
    assert _same(_features(target, images), expected)


def test_the_ignored_keys_are_the_heads_and_mask_tokens(sources, targets, tmp_path: Path):
    plain = _plain(sources["vit"][0])
    path = tmp_path / "ibot.pth"
    torch.save(
        {
            "student": _prefixed("module.backbone.", plain | {"masked_embed": torch.zeros(1, 192)}),
            "teacher": _prefixed("backbone.", plain) | {"head.last_layer2.weight": torch.zeros(3)},
        },
        path,
    )
    assert load_backbone_weights(str(path), targets["vit"]).ignored == ["head.last_layer2.weight"]
    student = load_backbone_weights(str(path), targets["vit"], part="student")
    assert (student.format, student.ignored) == ("iBOT", ["backbone.masked_embed"])
    path = tmp_path / "moco.pth"
    torch.save(_moco_v3(_plain(sources["resnet"][0]), "resnet"), path)
    loaded = load_backbone_weights(str(path), targets["resnet"])
    assert sorted(loaded.ignored) == ["base_encoder.fc.0.weight", "predictor.0.weight"]


def test_lightly_indices_are_those_of_torchvisions_resnet_children():
    torchvision = pytest.importorskip("torchvision")
    children = nn.Sequential(*list(torchvision.models.resnet18().children())[:-1])
    plain = _plain(create_backbone("resnet18", 224))
    assert set(_lightly_resnet(plain)) == set(children.state_dict())


def test_torchvision_vit_gives_torchvisions_own_class_token(targets, tmp_path: Path):
    """An independent reference: torchvision's ViT, its names mapped to timm's, computes the same token."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # torchvision's own size
    vision_transformer = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(3)
    reference = vision_transformer.VisionTransformer(32, 4, 12, 3, 192, 768, num_classes=10).eval()
    torch.save(reference.state_dict(), tmp_path / "vit.pth")
    loaded = load_backbone_weights(str(tmp_path / "vit.pth"), targets["vit"])
    assert loaded.format == "torchvision ViT" and loaded.ignored == ["heads.head.weight", "heads.head.bias"]
    reference.heads = nn.Identity()
    with torch.no_grad():
        expected = reference(images)
    torch.testing.assert_close(_features(targets["vit"], images)["knn"], expected, atol=1e-5, rtol=1e-5)


def test_parts_by_name_and_alias(sources, targets, tmp_path: Path):
    plain = _plain(sources["vit"][0])
    path = tmp_path / "checkpoint.pth"
    torch.save(_sslbench_checkpoint(plain, "vit"), path)
    for part in ("student", "online", "backbone"):
        loaded = load_backbone_weights(str(path), targets["vit"], part=part)
        assert loaded.part == "backbone"
        assert torch.equal(targets["vit"].model.cls_token, plain["cls_token"] + 1)
    with pytest.raises(SSLBenchError, match=r"unknown part 'target'.*valid parts: .*backbone.*teacher"):
        load_backbone_weights(str(path), targets["vit"], part="target")
    torch.save(plain, path)
    with pytest.raises(SSLBenchError, match="holds one network"):
        load_backbone_weights(str(path), targets["vit"], part="teacher")


def test_several_networks_without_a_rule_name_their_parts(sources, targets, tmp_path: Path):
    plain = _plain(sources["resnet"][0])
    path = tmp_path / "byol.pth"
    weights = _prefixed("online_network.", plain) | _prefixed("target_network.", _other(plain, whole=True))
    torch.save(weights, path)
    with pytest.raises(SSLBenchError, match=r"several networks \(online_network, target_network\).*--part"):
        load_backbone_weights(str(path), targets["resnet"])
    loaded = load_backbone_weights(str(path), targets["resnet"], part="online_network")
    assert loaded.part == "online_network"
    assert torch.equal(targets["resnet"].model.conv1.weight, plain["conv1.weight"])


def _damaged(plain: Plain) -> Plain:
    damaged = {k: v for k, v in plain.items() if k != "layer4.1.bn2.weight"}
    return damaged | {"layer5.0.conv1.weight": torch.zeros(1)}


def test_strict_refusal_lists_what_does_not_fit_and_loads_nothing(sources, targets, images, tmp_path: Path):
    path = tmp_path / "weights.pth"
    torch.save(_damaged(_plain(sources["resnet"][0])), path)
    target = _scrambled(targets["resnet"], seed=9)
    before = _features(target, images)
    with pytest.raises(SSLBenchError) as refused:
        load_backbone_weights(str(path), target)
    message = str(refused.value)
    assert "\n" not in message and "torchvision/timm ResNet" in message
    assert "1 missing (layer4.1.bn2.weight)" in message and "1 unexpected (layer5.0.conv1.weight)" in message
    assert "--allow-partial" in message
    assert _same(_features(target, images), before)


def test_allow_partial_loads_what_fits_and_records_the_rest(sources, targets, tmp_path: Path):
    plain = _plain(sources["resnet"][0])
    path = tmp_path / "weights.pth"
    torch.save(_damaged(plain), path)
    target = _scrambled(targets["resnet"], seed=9)
    kept = target.model.layer4[1].bn2.weight.clone()
    loaded = load_backbone_weights(str(path), target, allow_partial=True)
    assert loaded.partial and loaded.missing == ["layer4.1.bn2.weight"]
    assert loaded.unexpected == ["layer5.0.conv1.weight"]
    assert torch.equal(target.model.conv1.weight, plain["conv1.weight"])
    assert torch.equal(target.model.layer4[1].bn2.weight, kept)
    assert loaded.protocol() == {
        "format": "torchvision/timm ResNet",
        "source": "weights.pth",
        "part": None,
        "missing": 1,
        "unexpected": 1,
        "mismatched": 0,
        "ignored": 0,
        "resampled": [],
        "partial": True,
    }
    with pytest.raises(SSLBenchError, match="none of its weights fit"):
        load_backbone_weights(str(path), targets["vit"], allow_partial=True)


@pytest.mark.parametrize(
    ("arch", "trained_at", "loaded_at", "hint"),
    [
        ("resnet18", 32, 224, "--image-size 32, which builds the CIFAR stem"),
        ("resnet18", 224, 32, "--image-size 224, which builds the standard stem"),
        ("vit_tiny16", 32, 224, "patch 4, the backbone patch 16: evaluate at --image-size 32"),
    ],
)
def test_a_stem_of_another_size_names_the_size_to_use(arch, trained_at, loaded_at, hint, tmp_path: Path):
    path = tmp_path / "weights.pth"
    torch.save(_prefixed("model.", _plain(create_backbone(arch, trained_at))), path)
    with pytest.raises(SSLBenchError, match="of another shape") as refused:
        load_backbone_weights(str(path), create_backbone(arch, loaded_at))
    assert hint in str(refused.value)


def test_another_arch_is_named(sources, tmp_path: Path):
    path = tmp_path / "weights.pth"
    torch.save(_plain(sources["vit"][0]), path)
    with pytest.raises(SSLBenchError, match="holds a ViT-Ti/4: use --arch vit_tiny16"):
        load_backbone_weights(str(path), create_backbone("vit_s16", 32))


def test_dinov2_shapes_sslbench_cannot_build_are_said_in_one_line(sources, targets, tmp_path: Path):
    dinov2 = _dinov2(_plain(sources["vit"][0]))
    dinov2["patch_embed.proj.weight"] = torch.zeros(192, 3, 14, 14)
    dinov2 |= {f"blocks.{i // 3}.{i}.ls{j}.gamma": torch.ones(192) for i in range(12) for j in (1, 2)}
    dinov2["register_tokens"] = torch.zeros(1, 4, 192)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(dinov2, path)
    with pytest.raises(SSLBenchError) as refused:
        load_backbone_weights(str(path), targets["vit"])
    message = str(refused.value)
    assert "DINOv2 ViT-Ti/14 weights need a patch-14 ViT with LayerScale and registers" in message
    assert "25 unexpected (blocks.0.ls1.gamma, blocks.0.ls2.gamma" in message and "\n" not in message


def test_pos_embed_of_another_grid_is_resampled_as_dino_does(tmp_path: Path):
    """ViT-Ti/16 trained at 224 px (14x14), loaded at 96 px (6x6): the features on 96 px images equal
    those of the 224 px network, which resamples its positions the same way on the fly."""
    source = _scrambled(create_backbone("vit_tiny16", 224), seed=4)
    torch.save(source.state_dict(), tmp_path / "backbone.pt")
    target = create_backbone("vit_tiny16", 96)
    loaded = load_backbone_weights(str(tmp_path / "backbone.pt"), target)
    assert loaded.resampled == ["pos_embed 14x14 -> 6x6"] and not loaded.partial
    grid = resample_position_embeddings(source.model.pos_embed[:, 1:], (6, 6))
    assert torch.equal(target.model.pos_embed, torch.cat([source.model.pos_embed[:, :1], grid], dim=1))
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    assert _same(_features(target.eval(), images), _features(source, images))


def test_unreadable_files_get_one_line(tmp_path: Path, targets):
    vit = targets["vit"]
    cases: list[tuple[Path, str]] = []
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    cases.append((text, "not a file torch.save wrote"))
    truncated = tmp_path / "truncated.pth"
    torch.save({"a": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    cases.append((truncated, "not a readable torch file"))
    unsafe = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Opaque()}, unsafe)
    cases.append((unsafe, "Opaque"))
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    cases.append((listed, "holds a list, not a dict of weights"))
    nothing = tmp_path / "something.pth"
    torch.save({"something": torch.zeros(3)}, nothing)
    cases.append((nothing, "no ResNet or ViT in its keys"))
    cases += [(tmp_path / "absent.pth", "no such file"), (tmp_path, "a folder, not a weights file")]
    for path, expected in cases:
        with pytest.raises(SSLBenchError) as refused:
            load_backbone_weights(str(path), vit)
        assert expected in str(refused.value) and "\n" not in str(refused.value), path
    with pytest.raises(SSLBenchError, match=r"weights_only=False"):
        load_backbone_weights(str(unsafe), vit)


def test_safetensors_are_read_by_their_header(sources, targets, images, tmp_path: Path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source, expected = sources["resnet"]
    path = tmp_path / "weights.bin"
    safetensors_torch.save_file({k: v.contiguous() for k, v in _plain(source).items()}, str(path))
    target = _scrambled(targets["resnet"], seed=11)
    assert load_backbone_weights(str(path), target).format == "torchvision/timm ResNet"
    assert _same(_features(target, images), expected)


def _empty_caches(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "TORCH_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(home))


def test_timm_weights_not_in_the_cache_say_where_and_how(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    _empty_caches(monkeypatch, tmp_path)
    with pytest.raises(SSLBenchError) as refused:
        load_backbone_weights("timm:resnet18", create_backbone("resnet18", 224))
    message = str(refused.value)
    assert "not in the local cache" in message and str(tmp_path / ".cache" / "huggingface" / "hub") in message
    assert "timm.create_model('resnet18', pretrained=True)" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # nothing fetched, nothing written
    with pytest.raises(SSLBenchError, match="timm has no model of that name"):
        load_backbone_weights("timm:resnet_eighteen", create_backbone("resnet18", 224))


def test_timm_weights_in_the_cache_load_without_the_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>/pytorch_model.bin), filled by hand."""
    _empty_caches(monkeypatch, tmp_path)
    source = _scrambled(create_backbone("resnet18", 224), seed=5)
    repo = tmp_path / ".cache" / "huggingface" / "hub" / "models--timm--resnet18.a1_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    weights = _plain(source) | {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(weights, repo / "snapshots" / commit / "pytorch_model.bin")
    target = create_backbone("resnet18", 224).eval()
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    offline_before = hub_constants.HF_HUB_OFFLINE
    loaded: LoadedWeights = load_backbone_weights("timm:resnet18", target)
    assert offline_before == hub_constants.HF_HUB_OFFLINE  # offline only during the call
    assert (loaded.format, loaded.source) == ("timm:resnet18", "timm:resnet18")
    assert loaded.ignored == ["fc.weight", "fc.bias"]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert _same(_features(target, images), _features(source, images))


def test_protocol_names_sslbench_files_with_their_pair(sources, targets, tmp_path: Path):
    pair = tmp_path / "dino-vit_tiny16"
    (pair / "checkpoints").mkdir(parents=True)
    plain = _plain(sources["vit"][0])
    torch.save(_prefixed("model.", plain), pair / "backbone.pt")
    torch.save(_sslbench_checkpoint(plain, "vit"), pair / "checkpoints" / "iter-00000003.pt")
    assert load_backbone_weights(str(pair / "backbone.pt"), targets["vit"]).protocol()["source"] == (
        "dino-vit_tiny16/backbone.pt"
    )
    record = load_backbone_weights(str(pair / "checkpoints" / "iter-00000003.pt"), targets["vit"]).protocol()
    assert record["source"] == "dino-vit_tiny16/checkpoints/iter-00000003.pt"
    assert (record["format"], record["part"], record["ignored"]) == ("sslbench checkpoint", "teacher", 2)
