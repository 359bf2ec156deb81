"""A backbone's weights from files sslbench did not necessarily write, recognised from their keys.

``load_backbone_weights(spec, backbone)`` reads a file (or ``timm:<model_name>`` from the local cache),
tells its format from the keys alone (``detect``), picks one network of it (``part``), renames its keys to
those of ``Backbone.model`` (``sslbench.models.weight_layouts``) and loads them strictly: a missing,
unexpected or differently shaped key is refused with the list, unless partial loading is allowed, and then
recorded. A ViT's position embeddings of another grid are resampled as DINO does
(``sslbench.models.vit.resample_position_embeddings``). Which network of a checkpoint is read by default
follows each project's own evaluation code (the rules of ``sslbench.models.weight_layouts.detect``).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sslbench.base.errors import SSLBenchError
from sslbench.models.backbones import Backbone
from sslbench.models.vit import resample_position_embeddings
from sslbench.models.weight_layouts import Detection, NetworkShape, describe_network, detect, timm_key

__all__ = [
    "Detection",
    "LoadedWeights",
    "detect",
    "detect_format",
    "load_backbone_weights",
    "read_weights_file",
]


@dataclass
class LoadedWeights:
    """What was read, from where, and every key that did not load as it was."""

    format: str  # "sslbench backbone.pt", "DINO checkpoint", "MoCo v3", "timm:<name>", ...
    source: str  # the path as given, or timm:<name>
    part: str | None  # the network of a checkpoint that was read (teacher, student, base_encoder, ...)
    missing: list[str] = field(default_factory=list)  # backbone (timm) keys the file did not provide
    unexpected: list[str] = field(default_factory=list)  # file keys, renamed, the backbone has no place for
    ignored: list[str] = field(default_factory=list)  # dropped on purpose: classifiers, heads, mask tokens
    resampled: list[str] = field(default_factory=list)  # "pos_embed 14x14 -> 4x4"
    partial: bool = False  # loaded although keys did not fit, because partial loading was allowed
    mismatched: list[str] = field(default_factory=list)  # "key: file AxB, backbone CxD" (not loaded)
    evidence: str = ""  # the keys that told the format

    def protocol(self) -> dict[str, Any]:
        """The record that goes beside the numbers: counts, not key lists, so a protocol stays readable."""
        return {
            "format": self.format,
            "source": _short_source(self.source),
            "part": self.part,
            "missing": len(self.missing),
            "unexpected": len(self.unexpected),
            "mismatched": len(self.mismatched),
            "ignored": len(self.ignored),
            "resampled": list(self.resampled),
            "partial": self.partial,
        }


def detect_format(payload: Mapping[str, Any]) -> str:
    """The format of a loaded file, from its keys (never its name), e.g. ``"DINO checkpoint"``."""
    return detect(payload).format


def load_backbone_weights(
    spec: str, backbone: Backbone, *, part: str | None = None, allow_partial: bool = False
) -> LoadedWeights:
    """Load ``spec`` (a file, or ``timm:<model_name>`` already in the local cache) into ``backbone.model``.

    ``part`` picks a network of a training checkpoint (``teacher``, ``student``, ``base_encoder``, ...;
    default: the one the format's own evaluation reads). Raises ``SSLBenchError`` when the weights do not
    fit exactly, unless ``allow_partial``; a file whose keys fit nothing is refused either way.
    """
    if spec.startswith("timm:"):
        name = spec.split(":", 1)[1]
        detection = Detection.single(
            f"timm:{name}", f"timm.create_model('{name}', pretrained=True)", _timm(name)
        )
    else:
        detection = detect(read_weights_file(Path(spec)), source=spec)
    chosen = detection.choose(part, spec)
    mapped, ignored = _renamed(detection, detection.parts[chosen])
    loaded = LoadedWeights(
        detection.format, spec, chosen or None, ignored=ignored, evidence=detection.evidence
    )
    _load_matching(mapped, backbone, loaded, allow_partial)
    return loaded


def read_weights_file(path: Path) -> Mapping[str, Any]:
    """The file's contents with ``torch.load(weights_only=True)`` (no code from the file runs), or a
    ``.safetensors`` file (told by its header); one line on what is wrong otherwise."""
    if path.is_dir():
        inside = " (it has a backbone.pt: pass that)" if (path / "backbone.pt").is_file() else ""
        raise SSLBenchError(f"{path}: a folder, not a weights file{inside}")
    if not path.is_file():
        raise SSLBenchError(
            f"{path}: no such file; give a weights file (.pt, .pth, .ckpt) or timm:<model_name>"
        )
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        # DINO's and iBOT's checkpoints keep their argparse options beside the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):
            raise SSLBenchError(f"{path}: not a file torch.save wrote (or it is damaged)") from error
        raise SSLBenchError(_unsafe_objects_message(path, error)) from error
    except Exception as error:  # a truncated zip, a short read: unusable whatever the cause
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise SSLBenchError(f"{path}: not a readable torch file ({reason})") from error
    if not isinstance(payload, Mapping):
        raise SSLBenchError(f"{path}: holds a {type(payload).__name__}, not a dict of weights (a state dict)")
    return payload


def _is_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    with path.open("rb") as stream:
        start = stream.read(10)
    return len(start) == 10 and start[8:10] in (b'{"', b"{}") and int.from_bytes(start[:8], "little") > 1


def _unsafe_objects_message(path: Path, error: Exception) -> str:
    names = re.findall(r"GLOBAL ([\w.]+)", str(error))
    with contextlib.suppress(Exception):  # an old-format file: the names from the message will do
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path) or names
    return (
        f"{path}: holds Python objects ({', '.join(sorted(set(names))[:3]) or 'unknown'}) that loading "
        "weights only does not create; on a machine where you trust the file, keep only its weights: "
        f"python -c \"import torch; c = torch.load('{path}', weights_only=False); "
        "torch.save(c.get('state_dict', c), 'weights.pt')\" and pass weights.pt"
    )


def _renamed(detection: Detection, prefix: str) -> tuple[dict[str, Tensor], list[str]]:
    """The chosen network's weights under timm's names, and the keys dropped on purpose: the network's
    own classifier or mask token, and every key beside it that belongs to no network (heads,
    projectors, predictors, centres); keys given relative to the part's scope."""
    kind = detection.networks[prefix]
    scope = detection.scope(prefix)
    mapped: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in detection.weights.items():
        if key.startswith(prefix):
            name = timm_key(key[len(prefix) :], kind)
            if name is None:
                ignored.append(key[len(scope) :])
            else:
                mapped[name] = value
        elif key.startswith(scope) and not any(key.startswith(other) for other in detection.networks):
            ignored.append(key[len(scope) :])
    return mapped, ignored


def _load_matching(
    mapped: dict[str, Tensor], backbone: Backbone, loaded: LoadedWeights, allow_partial: bool
) -> None:
    """Compare names and shapes with ``backbone.model``'s, resample ``pos_embed``, refuse or record what
    does not fit, and load the rest."""
    target = backbone.model.state_dict()
    # BatchNorm's count of batches is not a weight (older torchvision files lack it): keep the backbone's.
    loaded.missing = [k for k in target if k not in mapped and not k.endswith("num_batches_tracked")]
    loaded.unexpected = [k for k in mapped if k not in target]
    fitting: dict[str, Tensor] = {}
    for key, value in mapped.items():
        if key not in target:
            continue
        wanted = target[key].shape
        if value.shape == wanted:
            fitting[key] = value
        elif key == "pos_embed" and (resized := _resampled_positions(value, wanted)) is not None:
            fitting[key] = resized
            loaded.resampled.append(f"pos_embed {_grid(value)} -> {_grid(resized)}")
        else:
            loaded.mismatched.append(f"{key}: file {_shape(value)}, backbone {_shape(target[key])}")
    problems = loaded.missing or loaded.unexpected or loaded.mismatched
    if problems and (not allow_partial or not fitting):
        raise SSLBenchError(_refusal(loaded, mapped, target, backbone, allow_partial))
    loaded.partial = bool(problems)
    backbone.model.load_state_dict(target | fitting, strict=True)


def _resampled_positions(value: Tensor, wanted: torch.Size) -> Tensor | None:
    """A class token's position plus a square grid, resampled to the backbone's grid as DINO does."""
    if value.dim() != 3 or len(wanted) != 3 or value.shape[2] != wanted[2]:
        return None
    old, new = value.shape[1] - 1, wanted[1] - 1
    old_side, new_side = round(old**0.5), round(new**0.5)
    if old_side * old_side != old or new_side * new_side != new:
        return None
    grid = resample_position_embeddings(value[:, 1:], (new_side, new_side))
    return torch.cat([value[:, :1], grid], dim=1)


def _refusal(
    loaded: LoadedWeights,
    mapped: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    backbone: Backbone,
    allow_partial: bool,
) -> str:
    part = f", part {loaded.part}" if loaded.part else ""
    found = []
    for count_of, label in ((loaded.missing, "missing"), (loaded.unexpected, "unexpected")):
        if count_of:
            found.append(f"{len(count_of)} {label} ({_few(count_of)})")
    if loaded.mismatched:
        found.append(f"{len(loaded.mismatched)} of another shape ({_few(loaded.mismatched, 2)})")
    hint = _fit_hint(loaded.format, describe_network(mapped), describe_network(target), backbone.arch)
    if allow_partial:
        action = "none of its weights fit, so nothing was loaded"
    else:
        action = "--allow-partial (allow_partial=True) loads what fits, and records it"
    return (
        f"{loaded.source} ({loaded.format}{part}) does not fit {backbone.arch}: {', '.join(found)}; "
        + hint
        + action
    )


def _fit_hint(format_name: str, weights: NetworkShape | None, wanted: NetworkShape | None, arch: str) -> str:
    """Why the shapes differ and what to run instead, read from the weights' names and shapes."""
    if weights is None or wanted is None:
        return ""
    unbuildable = weights.family == "vit" and not (weights.stem == 16 or 1 <= weights.stem <= 8)
    if weights.layer_scale or weights.registers or unbuildable:  # sslbench's ViTs: patch 16, or size // 8
        extras = [
            name
            for name, has in (("LayerScale", weights.layer_scale), ("registers", weights.registers))
            if has
        ]
        network = f"a patch-{weights.stem} ViT" if unbuildable else "a ViT"
        network += f" with {' and '.join(extras)}" if extras else ""
        dinov2 = "DINOv2 " if format_name == "DINOv2" else ""
        return f"{dinov2}{weights.label} weights need {network}, which sslbench's archs are not; "
    if weights.arch != arch:
        use = f"use --arch {weights.arch}" if weights.arch else "none of sslbench's archs"
        return f"the file holds a {weights.label}: {use}; "
    if weights.stem == wanted.stem:
        return ""
    if weights.family == "vit":
        size = 224 if weights.stem == 16 else 8 * weights.stem
        return (
            f"the weights have patch {weights.stem}, the backbone patch {wanted.stem}: evaluate at "
            f"--image-size {size}, which builds patch {weights.stem}; "
        )
    if weights.stem == 7:
        return (
            "the weights have ResNet's standard 7x7 stem, the backbone the CIFAR 3x3 stem of images up to "
            "64 px: evaluate at --image-size 224, which builds the standard stem; "
        )
    return (
        f"the weights have a {weights.stem}x{weights.stem} (CIFAR) stem, the backbone the standard 7x7 one: "
        "evaluate at --image-size 32, which builds the CIFAR stem; "
    )


def _timm(name: str) -> dict[str, Tensor]:
    """``timm.create_model(name, pretrained=True)`` from a file already in the local cache; never the
    network (the cached file is passed to timm, whose checkpoint filters still convert it)."""
    import timm
    from timm.models import get_pretrained_cfg

    if name.startswith(("hf-hub:", "hf_hub:")):
        raise SSLBenchError(
            f"timm:{name}: only timm's registered names are read from the cache; pass the file"
        )
    if not timm.is_model(name.split(".", 1)[0]):
        close = difflib.get_close_matches(name.split(".", 1)[0], timm.list_models(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SSLBenchError(f"timm:{name}: timm has no model of that name{hint}; see timm.list_pretrained()")
    config = get_pretrained_cfg(name)
    if config is None:
        raise SSLBenchError(f"timm:{name}: timm has no pretrained weights for it; see timm.list_pretrained()")
    cached, looked = _cached_timm_file(config)
    if cached is None:
        raise SSLBenchError(
            f"timm:{name}: its weights are not in the local cache (looked in {' and '.join(looked)}); "
            f"with network, run python -c \"import timm; timm.create_model('{name}', pretrained=True)\" "
            "with the same cache (HF_HOME / TORCH_HOME), or pass the weights file"
        )
    with _offline():
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)})
    return dict(model.state_dict())


def _cached_timm_file(config: Any) -> tuple[Path | None, list[str]]:
    """The cached weights timm would download for ``config``, from the Hugging Face cache (safetensors
    first, as timm) or torch hub's checkpoint folder, both read from the environment now."""
    looked: list[str] = []
    if config.hf_hub_id:
        cache = _hf_hub_cache()
        looked.append(str(cache))
        repo, _, revision = config.hf_hub_id.partition("@")
        names = [config.hf_hub_filename] if config.hf_hub_filename else []
        names += ["model.safetensors", "pytorch_model.bin"]
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # no hub client: only torch hub's folder can hold the file
            names = []
        for filename in names:
            found = try_to_load_from_cache(repo, filename, cache_dir=str(cache), revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found), looked
    if config.url:
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        looked.append(str(folder))
        candidate = folder / os.path.basename(config.url.split("?")[0])
        if candidate.is_file():
            return candidate, looked
    return None, looked


def _hf_hub_cache() -> Path:
    """huggingface_hub's cache folder from the environment as it is now (the library reads it once, at
    import)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home).expanduser() / "huggingface" / "hub"


@contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face Hub offline mode, in the environment and in the constant the hub client read from it
    at import: with the file given, no request should be made, and one that is fails instead."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:
        constants = None
    was_offline = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = was_offline
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _few(keys: list[str], shown: int = 4) -> str:
    more = f", ... (+{len(keys) - shown})" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def _shape(value: Tensor) -> str:
    return "x".join(str(size) for size in value.shape) or "scalar"


def _grid(positions: Tensor) -> str:
    side = round((positions.shape[1] - 1) ** 0.5)
    return f"{side}x{side}"


def _short_source(source: str) -> str:
    """A file's name; for sslbench's own files the pair folder too (``dino-vit_s16/backbone.pt``)."""
    if source.startswith("timm:"):
        return source
    path = Path(source)
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/checkpoints/{path.name}"
    if path.name == "backbone.pt" and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name
