"""A trained backbone written as other tools load it (timm's hub folder, torchvision's layout, or plain
safetensors under timm's names), with the exact code that loads it and gives sslbench's features.

``export_backbone(torch.load("backbone.pt"), arch, image_size, out_dir, fmt)`` takes the state dict sslbench
saves beside ``eval.json`` (keys ``model.<timm key>``, or bare timm keys), refuses it unless it is ``arch``
at ``image_size`` px key for key and shape for shape, and writes:

- ``"timm"``: ``model.safetensors`` + ``config.json`` in timm's hub layout (``timm.models._hub``
  ``save_config_for_hf``), for ``timm.create_model("local-dir:<out_dir>", pretrained=True)``; or, without
  the config, ``timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=dict(file=<the
  .safetensors>, num_classes=0), num_classes=0, **model_kwargs)``, whose overlay ``num_classes=0`` keeps
  the load strict (timm's ``load_pretrained`` drops the classifier and loads non-strictly when the
  pretrained config's class count differs from the model's). The CIFAR stem of small-image ResNets has
  no timm constructor argument: ``create_model(timm_name, num_classes=0)``, ``CIFAR_STEM_LINES``, then
  ``timm.models.load_checkpoint(model, <the .safetensors>)``.
- ``"torchvision"``: ``torchvision_weights.pth`` for ``torchvision.models.resnet18()/resnet50()`` or
  ``VisionTransformer(...)``, without classifier: ``fc`` / ``heads`` = ``nn.Identity()``, then a strict
  ``load_state_dict(torch.load(<file>, weights_only=True))``.
- ``"safetensors"``: ``backbone.safetensors`` (timm's names, as trained) + ``backbone.json`` (arch, sizes,
  stem).

``load_code`` is the recipe with the real path; each folder's JSON keeps it too. ViT features equal
sslbench's at the trained size; elsewhere sslbench resamples position embeddings as DINO does
(``sslbench.models.vit``), timm with its own interpolation, torchvision not at all. A size of no whole
number of patches, which sslbench pads, goes to timm with the positions resampled to the padded grid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sslbench.base.atomic_io import atomic_path, make_folder, write_json_atomic
from sslbench.base.errors import SSLBenchError, unknown_name_message
from sslbench.base.small_images import SMALL_IMAGE_MAX
from sslbench.models.backbones import arch_spec, create_backbone, effective_patch_size
from sslbench.models.vit import VIT_SHAPES, resample_position_embeddings

__all__ = ["CIFAR_STEM_LINES", "FORMATS", "ExportedWeights", "export_backbone", "timm_model_kwargs"]

# format -> the files it writes into out_dir (all checked before anything is written)
FORMATS: dict[str, tuple[str, str]] = {
    "safetensors": ("backbone.safetensors", "backbone.json"),
    "timm": ("model.safetensors", "config.json"),
    "torchvision": ("torchvision_weights.pth", "torchvision_weights.json"),
}
# The CIFAR stem (SimCLR, Chen et al. 2020, Appendix B.9; ``create_backbone``) for timm's and torchvision's
# ResNets alike: applied once the model is built, before its weights are loaded.
CIFAR_STEM_LINES = (
    "model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)",
    "model.maxpool = torch.nn.Identity()",
)
_REFERENCE_SIZE = 224  # above small images sslbench's eval resizes to image_size * 256 / 224, then crops
_MAX_LISTED = 3  # keys named in a refusal; the rest are counted
_DYNAMIC = {"dynamic_img_size": True, "dynamic_img_pad": True}  # as sslbench's ViTs: pad, take any size
_HERE = "<this folder>"  # the export folder, in the recipes the JSON files keep (folders move)

# timm's ViT names -> torchvision's VisionTransformer's (torchvision/models/vision_transformer.py); the
# inverse of sslbench.models.weight_layouts' reading of torchvision's ViT.
_TORCHVISION_VIT_TOP = {
    "cls_token": "class_token",
    "pos_embed": "encoder.pos_embedding",
    "patch_embed.proj.weight": "conv_proj.weight",
    "patch_embed.proj.bias": "conv_proj.bias",
    "norm.weight": "encoder.ln.weight",
    "norm.bias": "encoder.ln.bias",
}
_TORCHVISION_VIT_BLOCK = {  # under blocks.<i>. -> under encoder.layers.encoder_layer_<i>.
    "norm1.": "ln_1.",
    "norm2.": "ln_2.",
    "attn.qkv.weight": "self_attention.in_proj_weight",  # rows q; k; v in both
    "attn.qkv.bias": "self_attention.in_proj_bias",
    "attn.proj.": "self_attention.out_proj.",
    "mlp.fc1.": "mlp.0.",
    "mlp.fc2.": "mlp.3.",
}


@dataclass
class ExportedWeights:
    """What was written and how to load it: ``load_code`` is Python that defines ``model``."""

    files: list[Path]
    format: str
    timm_name: str | None  # the timm model the files are for; None for torchvision's layout
    model_kwargs: dict[str, Any]  # timm's create_model kwargs besides num_classes=0, or torchvision's
    notes: list[str] = field(default_factory=list)  # the load line first, then what to know
    load_code: str = ""


@dataclass(frozen=True)
class _Network:
    """The network the weights belong to, as sslbench built it."""

    arch: str
    timm_name: str
    family: str  # "resnet" | "vit"
    image_size: int
    patch_size: int | None
    stem: str | None  # ResNets: "cifar" (<= SMALL_IMAGE_MAX px) or "imagenet"; ViTs: None
    feature_dim: int
    shapes: dict[str, torch.Size]  # Backbone.model's state dict: every key, with its shape

    @property
    def padded(self) -> bool:
        """A ViT whose image size is no whole number of patches: sslbench pads it (``dynamic_img_pad``)."""
        return self.patch_size is not None and self.image_size % self.patch_size != 0

    @property
    def grid_side(self) -> int:
        """A ViT's patches per side at the trained size, after sslbench's padding."""
        return -(-self.image_size // (self.patch_size or 1))

    def describe(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ("arch", "timm_name", "image_size", "patch_size", "stem")}


def export_backbone(
    state_dict: Mapping[str, Tensor],
    arch: str,
    image_size: int,
    out_dir: Path,
    fmt: str,
    *,
    overwrite: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ExportedWeights:
    """Write ``state_dict`` (a ``Backbone``'s, or its ``.model``'s) as ``fmt``; see the module docstring.

    ``mean``/``std``: the normalisation the images were trained with, for timm's config (timm assumes
    ImageNet's without them). Files of the format's names in ``out_dir`` are replaced only with
    ``overwrite``.
    """
    if fmt not in FORMATS:
        raise SSLBenchError(unknown_name_message("format", fmt, FORMATS))
    given = mean is not None and std is not None
    if not given and (mean is not None or std is not None):
        raise SSLBenchError("mean and std go together: pass both (the training normalisation) or neither")
    network = _network(arch, image_size)
    _check_supported(network, fmt)
    weights = _timm_weights(state_dict, network)
    out_dir = make_folder(out_dir, "export folder")
    paths = [out_dir / name for name in FORMATS[fmt]]
    existing = [path.name for path in paths if path.exists()]
    if existing and not overwrite:
        raise SSLBenchError(
            f"{out_dir} already holds {', '.join(existing)}: pass overwrite=True to replace, "
            "or export to another folder"
        )
    if fmt == "timm":
        normalisation = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]} if given else {}
        return _export_timm(weights, network, paths, normalisation)
    if fmt == "torchvision":
        return _export_torchvision(weights, network, paths)
    return _export_safetensors(weights, network, paths)


def timm_model_kwargs(arch: str, image_size: int) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs besides ``num_classes=0`` with which stock timm computes
    sslbench's features from the ``"timm"`` export at ``image_size`` px; ``{}`` for ResNets."""
    network = _network(arch, image_size)
    if network.patch_size is None:
        return {}
    if not network.padded:
        return {"img_size": image_size, "patch_size": network.patch_size}
    padded_size = network.grid_side * network.patch_size
    return {"img_size": padded_size, "patch_size": network.patch_size} | _DYNAMIC


# --- what the weights are ----------------------------------------------------------------------------


def _network(arch: str, image_size: int) -> _Network:
    spec = arch_spec(arch)  # an unknown arch: one line with the valid ones
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise SSLBenchError(f"image_size must be a whole number of pixels >= 1, got {image_size!r}")
    stem = None
    if spec.family == "resnet":
        stem = "cifar" if image_size <= SMALL_IMAGE_MAX else "imagenet"
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        reference = create_backbone(arch, image_size)
    shapes = {key: value.shape for key, value in reference.model.state_dict().items()}
    patch_size = effective_patch_size(arch, image_size)
    return _Network(
        arch, spec.timm_name, spec.family, image_size, patch_size, stem, reference.feat_dim, shapes
    )


def _check_supported(network: _Network, fmt: str) -> None:
    if fmt == "torchvision" and network.padded:
        valid = ", ".join(name for name in FORMATS if name != "torchvision")
        raise SSLBenchError(
            f"torchvision's VisionTransformer needs whole patches, and {network.image_size} px is not a "
            f"multiple of patch {network.patch_size}; valid formats for {network.arch} at this size: {valid}"
        )


def _timm_weights(state_dict: Mapping[str, Tensor], network: _Network) -> dict[str, Tensor]:
    """The weights under ``Backbone.model``'s (timm's) names, refused unless they are exactly the network's
    keys and shapes: the wrong arch or image size would otherwise make a file no recipe loads."""
    prefixed = bool(state_dict) and all(key.startswith("model.") for key in state_dict)
    weights = {key.removeprefix("model.") if prefixed else key: value for key, value in state_dict.items()}
    tensors = {key for key, value in weights.items() if isinstance(value, Tensor)}
    problems = {
        "not tensors": [key for key in weights if key not in tensors],
        "missing": [key for key in network.shapes if key not in weights],
        "unexpected": [key for key in weights if key not in network.shapes],
        "shapes differ": [
            f"{key} {tuple(weights[key].shape)} (wanted {tuple(shape)})"
            for key, shape in network.shapes.items()
            if key in tensors and weights[key].shape != shape
        ],
    }
    found = "; ".join(f"{what}: {_listed(keys)}" for what, keys in problems.items() if keys)
    if found:
        raise SSLBenchError(
            f"the weights are not a {network.arch} backbone at {network.image_size} px ({found}): "
            "pass the arch and image_size of the eval.json beside backbone.pt"
        )
    return {
        key: value.detach().cpu().clone(memory_format=torch.contiguous_format)
        for key, value in weights.items()
    }


def _listed(keys: Sequence[str]) -> str:
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


# --- the formats ---------------------------------------------------------------------------------------


def _export_timm(
    weights: dict[str, Tensor], network: _Network, paths: list[Path], normalisation: dict[str, list[float]]
) -> ExportedWeights:
    weights_path, config_path = paths
    model_kwargs = timm_model_kwargs(network.arch, network.image_size)
    notes = []
    if network.padded:
        grid = network.grid_side
        positions = weights["pos_embed"]
        resampled = resample_position_embeddings(positions[:, 1:], (grid, grid))
        weights = weights | {"pos_embed": torch.cat([positions[:, :1], resampled], dim=1)}
        notes.append(f"position embeddings resampled to the padded {grid}x{grid} grid as sslbench does")
    _save_safetensors(weights, weights_path, network)

    def recipe(folder: str) -> list[str]:
        if network.stem != "cifar":
            return ["import timm", f"model = timm.create_model({'local-dir:' + folder!r}, pretrained=True)"]
        return [
            "import timm, torch",
            f"model = timm.create_model({network.timm_name!r}, num_classes=0)",
            *CIFAR_STEM_LINES,
            f"timm.models.load_checkpoint(model, {folder + '/' + weights_path.name!r})",
        ]

    write_json_atomic(config_path, _timm_config(network, model_kwargs, recipe(_HERE), normalisation))
    code = "\n".join(recipe(str(weights_path.parent.resolve())))
    if network.stem == "cifar":
        notes.append(
            "no timm constructor argument builds the CIFAR stem (3x3 conv, stride 1, no max-pool): the "
            "two stem lines go between create_model and loading (pretrained=True would load first)"
        )
    else:
        arguments = "".join(f", {key}={value!r}" for key, value in model_kwargs.items())
        notes.append(
            f"or, without config.json: timm.create_model({network.timm_name!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file=<{weights_path.name}>, num_classes=0), num_classes=0"
            f"{arguments}); the overlay's num_classes=0 keeps timm's load strict"
        )
    if not normalisation:
        notes.append("mean/std not recorded: timm's data config assumes ImageNet's; pass those trained with")
    return _exported(paths, "timm", network, network.timm_name, model_kwargs, code, notes)


def _timm_config(
    network: _Network, model_kwargs: dict[str, Any], recipe: list[str], normalisation: dict[str, list[float]]
) -> dict[str, Any]:
    """timm's hub ``config.json`` (``timm.models._hub.save_config_for_hf``), with sslbench's record under
    ``"sslbench"``; resize and crop are those of sslbench's eval (``build_eval_transform``)."""
    size, vit = network.image_size, network.family == "vit"
    resize_to = size if size <= SMALL_IMAGE_MAX else round(size * 256 / _REFERENCE_SIZE)
    # timm resizes to floor(size / crop_pct): crop_pct rounded down makes that resize_to exactly
    pretrained_cfg: dict[str, Any] = {
        "input_size": [3, size, size],
        "fixed_input_size": vit and not network.padded,
        "interpolation": "bicubic",
        "crop_pct": math.floor(size / resize_to * 1e6) / 1e6,
        "crop_mode": "center",
        "num_classes": 0,
        "first_conv": "patch_embed.proj" if vit else "conv1",
        "classifier": "head" if vit else "fc",
    } | normalisation
    return {
        "architecture": network.timm_name,
        "num_classes": 0,
        "num_features": network.feature_dim,
        "global_pool": "token" if vit else "avg",
        "model_args": model_kwargs,
        "pretrained_cfg": pretrained_cfg,
        "sslbench": network.describe() | {"load": recipe},
    }


def _export_torchvision(weights: dict[str, Tensor], network: _Network, paths: list[Path]) -> ExportedWeights:
    weights_path, sidecar_path = paths
    if network.family == "resnet":  # torchvision's and timm's ResNets share every name and compute the same
        constructor, kwargs, classifier, mapped = f"torchvision.models.{network.arch}", {}, "fc", weights
    else:
        constructor, classifier = "torchvision.models.VisionTransformer", "heads"
        mapped, kwargs = _torchvision_vit(weights, network)
    with atomic_path(weights_path) as tmp:
        torch.save(mapped, tmp)
    arguments = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())

    def recipe(path: str) -> list[str]:
        return [
            "import torch, torchvision",
            f"model = {constructor}({arguments})",
            *(CIFAR_STEM_LINES if network.stem == "cifar" else ()),
            f"model.{classifier} = torch.nn.Identity()",
            f"model.load_state_dict(torch.load({path!r}, weights_only=True))",
        ]

    sidecar = {"constructor": constructor, "kwargs": kwargs, "load": recipe(f"{_HERE}/{weights_path.name}")}
    write_json_atomic(sidecar_path, network.describe() | sidecar)
    code = "\n".join(recipe(str(weights_path.resolve())))
    note = f"the file holds no classifier: {classifier} = Identity() before the strict load"
    return _exported(paths, "torchvision", network, None, kwargs, code, [note])


def _torchvision_vit(weights: dict[str, Tensor], network: _Network) -> tuple[dict[str, Tensor], dict]:
    """The weights under torchvision's ``VisionTransformer`` names, and that constructor's arguments."""
    mapped: dict[str, Tensor] = {}
    for key, value in weights.items():
        if key in _TORCHVISION_VIT_TOP:
            mapped[_TORCHVISION_VIT_TOP[key]] = value
            continue
        _, index, rest = key.split(".", 2)  # every other key is blocks.<i>.<part>
        part = next(name for name in _TORCHVISION_VIT_BLOCK if rest.startswith(name))
        renamed = _TORCHVISION_VIT_BLOCK[part] + rest[len(part) :]
        mapped[f"encoder.layers.encoder_layer_{index}.{renamed}"] = value
    hidden_dim, depth, num_heads = VIT_SHAPES[network.timm_name]
    kwargs = {
        "image_size": network.image_size,
        "patch_size": network.patch_size,
        "num_layers": depth,
        "num_heads": num_heads,
        "hidden_dim": hidden_dim,
        "mlp_dim": int(weights["blocks.0.mlp.fc1.weight"].shape[0]),
    }
    return mapped, kwargs


def _export_safetensors(weights: dict[str, Tensor], network: _Network, paths: list[Path]) -> ExportedWeights:
    weights_path, sidecar_path = paths
    _save_safetensors(weights, weights_path, network)
    model_kwargs: dict[str, Any] = {}
    if network.patch_size is not None:  # the positions as trained: the grid of image_size, not padded
        model_kwargs = {"img_size": network.image_size, "patch_size": network.patch_size}
        model_kwargs |= _DYNAMIC if network.padded else {}
    arguments = "".join(f", {key}={value!r}" for key, value in model_kwargs.items())

    def recipe(path: str) -> list[str]:
        return [
            "import timm, torch, safetensors.torch",
            f"model = timm.create_model({network.timm_name!r}, num_classes=0{arguments})",
            *(CIFAR_STEM_LINES if network.stem == "cifar" else ()),
            f"model.load_state_dict(safetensors.torch.load_file({path!r}))",
        ]

    sidecar = {"timm_model_kwargs": model_kwargs, "load": recipe(f"{_HERE}/{weights_path.name}")}
    write_json_atomic(sidecar_path, network.describe() | sidecar)
    code = "\n".join(recipe(str(weights_path.resolve())))
    note = (
        "sslbench reads it as it reads backbone.pt: load_backbone_weights(<file>, "
        f"create_backbone({network.arch!r}, {network.image_size}))"
    )
    return _exported(paths, "safetensors", network, network.timm_name, model_kwargs, code, [note])


def _save_safetensors(weights: Mapping[str, Tensor], path: Path, network: _Network) -> None:
    from safetensors.torch import save_file  # optional for sslbench: only exports need it

    metadata = {"format": "pt"} | {key: json.dumps(value) for key, value in network.describe().items()}
    with atomic_path(path) as tmp:
        save_file(dict(weights), str(tmp), metadata=metadata)


def _exported(
    paths: list[Path],
    fmt: str,
    network: _Network,
    timm_name: str | None,
    model_kwargs: dict[str, Any],
    code: str,
    notes: list[str],
) -> ExportedWeights:
    """The result, its notes led by the load line and closed by where its features equal sslbench's."""
    closing = f"features equal sslbench's at {network.image_size} px"
    if network.family != "vit":
        closing = "pooled features equal sslbench's at any image size"
    elif network.padded and fmt != "timm":
        closing = "features near sslbench's only: timm resamples positions its own way (format 'timm': exact)"
    else:
        closing += "; at other sizes sslbench resamples position embeddings as DINO does, timm its own way"
    load_line = "load with: " + "; ".join(code.splitlines()[1:])
    return ExportedWeights(paths, fmt, timm_name, model_kwargs, [load_line, *notes, closing], code)
