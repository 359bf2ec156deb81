"""Write a network trained here into every other project's checkpoint layout that ``sslbench eval`` reads.

Run: ``python benchmarks/write_weight_layouts.py results/RUN/dino-vit_s16/backbone.pt OUT_DIR``, then the
``sslbench eval ...`` line it prints. The network each file is evaluated by holds the same weights, so every
row of that evaluation must show the same numbers: a loader that renames, drops or picks a network wrongly
shows up as a row that differs. The layouts are those ``sslbench.models.weight_layouts.detect`` recognises
(DINO, iBOT, DINOv2, MoCo v3, timm, torchvision, solo-learn, lightly), each checked with ``detect`` first.

The networks a checkpoint holds beside the evaluated one (DINO's student, MoCo v3's momentum encoder, ...)
hold the weights plus one, so reading the wrong one by default changes the numbers instead of passing
unnoticed (``--part student`` and the like give other numbers on purpose). Heads, projectors and mask
tokens are small stand-ins under their projects' names: loaders drop them.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sslbench.base.errors import SSLBenchError
from sslbench.models.weight_formats import read_weights_file
from sslbench.models.weight_layouts import describe_network, detect

Plain = dict[str, Tensor]  # a backbone's weights under timm's names


@dataclass(frozen=True)
class Source:
    """The trained backbone, and what the stand-in heads need to know of it."""

    weights: Plain
    family: str  # "resnet" | "vit"
    arch: str
    width: int  # the feature width: a classifier's or projector's input


def _prefixed(prefix: str, plain: Plain) -> Plain:
    return {prefix + key: value for key, value in plain.items()}


def _other(plain: Plain) -> Plain:
    """A network that must not be read by default: the weights plus one."""
    return {key: value + 1 if value.is_floating_point() else value for key, value in plain.items()}


def _linear(name: str, width: int, outputs: int = 8) -> Plain:
    """A head's first layer or a classifier under its project's name: loaders drop it whatever its size."""
    return {f"{name}.weight": torch.zeros(outputs, width), f"{name}.bias": torch.zeros(outputs)}


def _dino_or_ibot(source: Source, ibot: bool) -> dict[str, Any]:
    """main_dino.py's / main_ibot.py's save_dict: DDP wraps the student always, the teacher only when it
    has BatchNorm; iBOT's student ViT alone has ``masked_embed``, its heads a ``last_layer2``."""
    ddp = "module." if source.family == "resnet" else ""
    head = _linear("head.mlp.0", source.width) | {"head.last_layer.weight_g": torch.ones(16, 1)}
    head |= {"head.last_layer2.weight_g": torch.ones(16, 1)} if ibot else {}
    masked = {"masked_embed": torch.zeros(1, source.width)} if ibot else {}
    return {
        "student": _prefixed("module.", _prefixed("backbone.", _other(source.weights) | masked) | head),
        "teacher": _prefixed(ddp, _prefixed("backbone.", source.weights) | head),
        "epoch": 100,
        "args": argparse.Namespace(arch=source.arch),
        "ibot_loss" if ibot else "dino_loss": {"center": torch.zeros(1, 16)},
    }


def _moco_v3(source: Source) -> dict[str, Any]:
    """main_moco.py's checkpoint: the projector replaces each encoder's classifier (``fc`` / ``head``)."""
    projector = _linear("fc.0" if source.family == "resnet" else "head.0", source.width)
    weights = _prefixed("module.base_encoder.", source.weights | projector)
    weights |= _prefixed("module.momentum_encoder.", _other(source.weights) | projector)
    weights |= _linear("module.predictor.0", 8)
    return {"epoch": 300, "arch": source.arch, "state_dict": weights, "optimizer": {"state": {}}}


def _dinov2(source: Source, chunks: int = 1) -> Plain:
    """DINOv2's ViT: a mask token and, with ``chunks`` > 1 (its training), the blocks in FSDP chunks
    ``blocks.<chunk>.<block>`` whose block index stays global (dinov2 vision_transformer.py BlockChunk)."""
    depth = len({key.split(".")[1] for key in source.weights if key.startswith("blocks.")})
    out: Plain = {}
    for key, value in source.weights.items():
        if chunks > 1 and key.startswith("blocks."):
            key = f"blocks.{int(key.split('.')[1]) // max(depth // chunks, 1)}.{key.removeprefix('blocks.')}"
        out[key] = value
    return out | {"mask_token": torch.zeros(1, source.width)}


def _dinov2_teacher(source: Source) -> dict[str, Any]:
    """train.py's do_test: ``teacher_checkpoint.pth``, the teacher's backbone and both heads."""
    teacher = _prefixed("backbone.", _dinov2(source, chunks=4))
    return {
        "teacher": teacher
        | _linear("dino_head.mlp.0", source.width)
        | _linear("ibot_head.mlp.0", source.width)
    }


# timm's ViT names -> torchvision's VisionTransformer (torchvision/models/vision_transformer.py), in order.
_TORCHVISION_VIT = (
    (r"^cls_token$", "class_token"),
    (r"^pos_embed$", "encoder.pos_embedding"),
    (r"^patch_embed\.proj\.", "conv_proj."),
    (r"^norm\.", "encoder.ln."),
    (r"^blocks\.(\d+)\.", r"encoder.layers.encoder_layer_\1."),
    (r"\.norm(\d)\.", r".ln_\1."),
    (r"\.attn\.qkv\.(weight|bias)$", r".self_attention.in_proj_\1"),  # rows q; k; v in both
    (r"\.attn\.proj\.", ".self_attention.out_proj."),
    (r"\.mlp\.fc1\.", ".mlp.0."),
    (r"\.mlp\.fc2\.", ".mlp.3."),
)


def _torchvision(source: Source) -> Plain:
    """torchvision's ResNet has timm's names and an ImageNet ``fc``; its ViT renames every part."""
    if source.family == "resnet":
        return source.weights | _linear("fc", source.width, 1000)
    out: Plain = {}
    for key, value in source.weights.items():
        for pattern, replacement in _TORCHVISION_VIT:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out | _linear("heads.head", source.width, 1000)


def _lightning(weights: Plain) -> dict[str, Any]:
    return {"epoch": 99, "global_step": 1000, "pytorch-lightning_version": "2.1.0", "state_dict": weights}


def _solo_learn(source: Source) -> dict[str, Any]:
    """solo/methods/base.py (and base_momentum): backbone, online classifier, projector, momentum copies."""
    weights = _prefixed("backbone.", source.weights) | _prefixed("momentum_backbone.", _other(source.weights))
    weights |= _linear("projector.0", source.width) | _linear("momentum_projector.0", source.width)
    return _lightning(weights | _linear("classifier", source.width, 10))


def _lightly(source: Source) -> dict[str, Any]:
    """lightly's examples: BYOL keeps ``nn.Sequential(*list(resnet.children())[:-1])`` (indices 0, 1, 4-7
    are conv1, bn1, layer1-4); DINO a timm ViT in MaskedVisionTransformerTIMM (``.vit``, ``mask_token``)."""
    if source.family == "resnet":
        children = {"conv1": "0", "bn1": "1"} | {f"layer{i}": str(i + 3) for i in range(1, 5)}
        indexed = {children[k.split(".")[0]] + "." + k.split(".", 1)[1]: v for k, v in source.weights.items()}
        weights = _prefixed("backbone.", indexed) | _prefixed("backbone_momentum.", _other(indexed))
        return _lightning(weights | _linear("projection_head.layers.0", source.width))
    mask = {"mask_token": torch.zeros(1, 1, source.width)}
    weights = _prefixed("student_backbone.", _prefixed("vit.", _other(source.weights)) | mask)
    weights |= _prefixed("teacher_backbone.", _prefixed("vit.", source.weights) | mask)
    return _lightning(weights | _linear("student_head.layers.0", source.width))


BOTH, VIT = ("resnet", "vit"), ("vit",)
VIT_ONLY = "a layout of ViTs only"
AS_TORCHVISION = "a ResNet has torchvision's keys here: see torchvision.pth"
# file name -> (writer, families it applies to, the format detect() must name (its start), why others skip)
LAYOUTS: dict[str, tuple[Callable[[Source], Any], tuple[str, ...], str, str]] = {
    "dino_checkpoint.pth": (lambda s: _dino_or_ibot(s, ibot=False), BOTH, "DINO checkpoint", ""),
    "dino_backbone.pth": (lambda s: s.weights, VIT, "DINO backbone", AS_TORCHVISION),
    "mocov3.pth.tar": (_moco_v3, BOTH, "MoCo v3", ""),
    "mocov3_deit.pth": (lambda s: {"model": s.weights}, VIT, "MoCo v3", "convert_to_deit.py: ViTs only"),
    "ibot_checkpoint.pth": (lambda s: _dino_or_ibot(s, ibot=True), VIT, "iBOT", VIT_ONLY),
    "ibot_backbone.pth": (lambda s: {"state_dict": s.weights}, VIT, "iBOT", VIT_ONLY),
    "dinov2.pth": (_dinov2, VIT, "DINOv2", VIT_ONLY),
    "dinov2_teacher_checkpoint.pth": (_dinov2_teacher, VIT, "DINOv2", VIT_ONLY),
    "timm.pth": (lambda s: s.weights | _linear("head", s.width, 1000), VIT, "timm state", AS_TORCHVISION),
    "torchvision.pth": (_torchvision, BOTH, "torchvision", ""),  # torchvision ViT, torchvision/timm ResNet
    "solo_learn.ckpt": (_solo_learn, BOTH, "solo-learn", ""),
    "lightly.ckpt": (_lightly, BOTH, "lightly", ""),
}


def read_source(path: Path) -> Source:
    """sslbench's ``backbone.pt`` (``model.<timm key>``); anything else is refused in one line."""
    detection = detect(read_weights_file(path), source=str(path))
    if detection.format != "sslbench backbone.pt":
        raise SSLBenchError(f"{path}: a {detection.format} file; give sslbench's <method>-<arch>/backbone.pt")
    plain = {key.removeprefix("model."): value for key, value in detection.weights.items()}
    shape = describe_network(plain)
    if shape is None or shape.arch is None:
        raise SSLBenchError(f"{path}: not one of sslbench's archs; give a backbone.pt sslbench run wrote")
    return Source(plain, shape.family, shape.arch, _feature_width(plain, shape.family))


def _feature_width(plain: Plain, family: str) -> int:
    """A ViT's embedding width; a ResNet's pooled channels, those of layer4's last BatchNorm."""
    if family == "vit":
        return int(plain["cls_token"].shape[-1])
    norms = [value for key, value in plain.items() if key.startswith("layer4.") and value.dim() == 1]
    return int(norms[-1].shape[0])


def write_layouts(source: Source, out_dir: Path) -> list[Path]:
    """One file per layout that applies to the source's family, each detected as meant before it is saved."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for file_name, (write, families, format_name, skip_reason) in LAYOUTS.items():
        if source.family not in families:
            print(f"skipped {file_name}: {skip_reason}")
            continue
        payload = write(source)
        detection = detect(payload, source=file_name)
        if not detection.format.startswith(format_name):
            raise SSLBenchError(f"{file_name}: detected as {detection.format}, meant {format_name}")
        torch.save(payload, out_dir / file_name)
        written.append(out_dir / file_name)
        part = f", part {detection.default}" if detection.default else ""
        print(f"wrote {out_dir / file_name} ({detection.format}{part})")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backbone", type=Path, help="results/<run>/<method>-<arch>/backbone.pt")
    parser.add_argument("out_dir", type=Path, help="where the files are written")
    args = parser.parse_args()
    try:
        source = read_source(args.backbone)
        written = write_layouts(source, args.out_dir)
    except SSLBenchError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"sslbench eval {' '.join(map(str, written))} --arch {source.arch}")


if __name__ == "__main__":
    main()
