"""Where a ResNet or ViT sits in a weights file, and how its key names become the timm names of
``Backbone.model``.

A file, once unwrapped, is a flat dict of tensors. Each network in it is found by two keys only its root
has (``find_networks``), so a prefix such as ``module.base_encoder.`` or ``teacher.backbone.`` is read from
the keys, never assumed. Its keys are then renamed to timm's (``timm_key``):

- torchvision and timm ResNets share names (``conv1``, ``bn1``, ``layer1``-``4``; ``fc`` the classifier);
- lightly's examples keep ``nn.Sequential(*list(resnet.children())[:-1])`` of a torchvision ResNet, whose
  indices 0, 1, 4-7 are ``conv1``, ``bn1``, ``layer1``-``4`` (lightly ``examples/pytorch_lightning/byol.py``);
- DINO's, iBOT's and MoCo v3's ViTs use timm's names (dino ``vision_transformer.py``, ibot
  ``models/vision_transformer.py``, moco-v3 ``vits.py``, a timm ``VisionTransformer``);
- DINOv2's ViT (dinov2 ``dinov2/models/vision_transformer.py``) too, except block chunks for FSDP
  (``blocks.<chunk>.<block>.``, the block index kept global), ``register_tokens`` (timm: ``reg_token``)
  and its ``mask_token``;
- torchvision's ViT (``torchvision/models/vision_transformer.py``) names every part differently.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from sslbench.base.errors import SSLBenchError, unknown_name_message
from sslbench.models.backbones import ARCHS
from sslbench.models.vit import VIT_SHAPES

# DistributedDataParallel (``module.``) and torch.compile (``_orig_mod.``) wrap a network without naming a
# part of it; no ResNet or ViT has a submodule of either name.
WRAPPER_SEGMENTS = frozenset({"module", "_orig_mod"})

# kind -> (the key a network's root has, a second key that confirms it), both under the same prefix.
ROOT_MARKERS: dict[str, tuple[str, str]] = {
    "resnet": ("layer1.0.conv1.weight", "conv1.weight"),
    "lightly-resnet": ("4.0.conv1.weight", "0.weight"),
    "vit": ("patch_embed.proj.weight", "cls_token"),
    "torchvision-vit": ("conv_proj.weight", "class_token"),
}

# Children of torchvision's ResNet in order: conv1, bn1, relu, maxpool, layer1-4, avgpool, fc.
_LIGHTLY_RESNET_CHILDREN = {"0": "conv1", "1": "bn1"} | {str(i): f"layer{i - 3}" for i in range(4, 8)}

# Keys a backbone has no use for: classifiers, and projectors kept where a classifier was (MoCo v3 puts
# its projector in ``fc`` / ``head``), mask tokens of masked-image modelling (iBOT, DINOv2, lightly).
_DROPPED = {
    "resnet": re.compile(r"^fc\."),
    "vit": re.compile(r"^(head\.|head_dist\.|mask_token$|masked_embed$)"),
    "torchvision-vit": re.compile(r"^heads\."),
}

_TORCHVISION_VIT_BLOCK = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$")
_TORCHVISION_VIT_BLOCK_PARTS = (
    ("ln_1.", "norm1."),
    ("ln_2.", "norm2."),
    ("self_attention.in_proj_weight", "attn.qkv.weight"),  # rows q; k; v, as timm's qkv
    ("self_attention.in_proj_bias", "attn.qkv.bias"),
    ("self_attention.out_proj.", "attn.proj."),
    ("mlp.0.", "mlp.fc1."),
    ("mlp.linear_1.", "mlp.fc1."),
    ("mlp.3.", "mlp.fc2."),
    ("mlp.linear_2.", "mlp.fc2."),
)
_TORCHVISION_VIT_TOP = (
    ("class_token", "cls_token"),
    ("conv_proj.", "patch_embed.proj."),
    ("encoder.pos_embedding", "pos_embed"),
    ("encoder.ln.", "norm."),
)
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_VIT_NAMES = {192: "ViT-Ti", 384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H", 1536: "ViT-g"}


def strip_wrappers(key: str) -> str:
    return ".".join(segment for segment in key.split(".") if segment not in WRAPPER_SEGMENTS)


def find_networks(keys: Iterable[str]) -> dict[str, str]:
    """``{prefix: kind}`` of every ResNet or ViT root among ``keys`` (prefix ``""`` or ending in ``.``)."""
    key_set = set(keys)
    found: dict[str, str] = {}
    for key in sorted(key_set):
        for kind, (marker, confirm) in ROOT_MARKERS.items():
            if not key.endswith(marker):
                continue
            prefix = key[: -len(marker)]
            if (prefix == "" or prefix.endswith(".")) and prefix + confirm in key_set:
                found.setdefault(prefix, kind)
    return found


def dinov2_signals(keys: Iterable[str]) -> list[str]:
    """The keys only DINOv2's ViT has (its ``mask_token``, block chunks, ``register_tokens``)."""
    key_list = list(keys)
    signals = [name for name in ("mask_token", "register_tokens") if name in key_list]
    if any(_CHUNKED_BLOCK.match(key) for key in key_list):
        signals.append("blocks.<chunk>.<block>.*")
    return signals


def timm_key(key: str, kind: str) -> str | None:
    """The timm name of ``key`` (relative to its network's root) in a network of ``kind``; None for a key
    dropped on purpose. A key with no timm counterpart is returned as it is (then reported unexpected)."""
    if kind == "lightly-resnet":
        head, _, rest = key.partition(".")
        if head not in _LIGHTLY_RESNET_CHILDREN:
            return key
        return timm_key(f"{_LIGHTLY_RESNET_CHILDREN[head]}.{rest}", "resnet")
    if kind == "torchvision-vit":
        return _torchvision_vit_key(key)
    if _DROPPED[kind].match(key):
        return None
    if kind == "vit":
        if key == "register_tokens":
            return "reg_token"
        return _CHUNKED_BLOCK.sub(r"blocks.\1.", key)
    return key


def _torchvision_vit_key(key: str) -> str | None:
    if _DROPPED["torchvision-vit"].match(key):
        return None
    block = _TORCHVISION_VIT_BLOCK.match(key)
    if block:
        index, rest = block.groups()
        for old, new in _TORCHVISION_VIT_BLOCK_PARTS:
            if rest.startswith(old):
                return f"blocks.{index}.{new}{rest[len(old) :]}"
        return key
    for old, new in _TORCHVISION_VIT_TOP:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


@dataclass(frozen=True)
class NetworkShape:
    """What a set of timm-named weights is, read from names and shapes, for the hints of a refusal."""

    family: str  # "resnet" | "vit"
    label: str  # "ResNet-50", "ViT-S/14"
    arch: str | None  # the sslbench arch of that shape, if one is
    stem: int  # ResNet: conv1's kernel (7 standard, 3 CIFAR); ViT: the patch size
    layer_scale: bool = False
    registers: bool = False


def describe_network(state: Mapping[str, Tensor]) -> NetworkShape | None:
    if "layer1.0.conv1.weight" in state and "conv1.weight" in state:
        bottleneck = "layer1.0.conv3.weight" in state
        blocks = [_count(state, rf"^layer{stage}\.(\d+)\.") for stage in range(1, 5)]
        depth = 2 + sum(blocks) * (3 if bottleneck else 2)
        arch = f"resnet{depth}" if f"resnet{depth}" in ARCHS else None
        return NetworkShape("resnet", f"ResNet-{depth}", arch, int(state["conv1.weight"].shape[-1]))
    if "patch_embed.proj.weight" in state:
        width, patch = state["patch_embed.proj.weight"].shape[0], state["patch_embed.proj.weight"].shape[-1]
        depth = _count(state, r"^blocks\.(\d+)\.")
        shapes = {name: VIT_SHAPES.get(spec.timm_name, (0, 0))[:2] for name, spec in ARCHS.items()}
        arch = next((name for name, shape in shapes.items() if shape == (width, depth)), None)
        label = f"{_VIT_NAMES.get(width, f'ViT (width {width}, {depth} blocks)')}/{patch}"
        layer_scale = any(key.endswith(".ls1.gamma") for key in state)
        return NetworkShape("vit", label, arch, int(patch), layer_scale, "reg_token" in state)
    return None


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({match.group(1) for key in state if (match := regex.match(key))})


# The containers a file keeps its networks in, first match wins: sslbench's training checkpoint
# (``method``), DINO's / iBOT's / DINOv2's (``student``, ``teacher``), MoCo v3's, iBOT's released backbones
# and Lightning's (``state_dict``), DINOv2's training checkpoint and DeiT's (``model``).
_LIGHTLY_NETWORKS = ("teacher_backbone", "backbone", "student_backbone")  # default: the first present
_LIGHTLY_MARKS = {"backbone_momentum", "student_backbone", "teacher_backbone", "projection_head"}
_SOLO_MARKS = {"momentum_backbone", "classifier", "projector", "momentum_projector"}
_EMA_ALIASES = ("momentum", "ema", "target", "key", "teacher")


@dataclass
class Detection:
    """A file's format, told from its keys, and the networks in it by part name."""

    format: str
    evidence: str  # the keys that told it
    weights: dict[str, Tensor]  # every tensor of the file's container, wrapper segments removed
    networks: dict[str, str]  # prefix -> kind ("resnet", "vit", "lightly-resnet", "torchvision-vit")
    parts: dict[str, str]  # part name -> prefix; one unnamed part ("") for a file of one network
    default: str | None  # the part read when none is asked for; None: the caller must choose
    aliases: dict[str, str] = field(default_factory=dict)  # other names a part answers to
    nested: bool = False  # parts were separate dicts (student, teacher): keys beside one are its own

    @classmethod
    def single(cls, format_name: str, evidence: str, weights: dict[str, Tensor]) -> Detection:
        networks = find_networks(weights)
        prefix = next(iter(networks), "")
        return cls(format_name, evidence, weights, networks, {"": prefix}, "")

    def choose(self, part: str | None, source: str) -> str:
        """The part to read: ``part`` (or an alias of one), else the format's default."""
        named = sorted(name for name in self.parts if name)
        where = f"{source} ({self.format})"
        if part is None:
            if self.default is None:
                raise SSLBenchError(
                    f"{where} holds several networks ({', '.join(named)}) and no rule says which one is "
                    "evaluated: choose one with --part (part=...)"
                )
            return self.default
        if not named:
            raise SSLBenchError(f"{where} holds one network, so there is no part to choose: leave --part out")
        name = self.aliases.get(part, part)
        if name not in self.parts:
            raise SSLBenchError(f"{where}: {unknown_name_message('part', part, named + list(self.aliases))}")
        return name

    def scope(self, prefix: str) -> str:
        """Where the keys that belong with the network at ``prefix`` live (its own dict when nested)."""
        return prefix.split(".", 1)[0] + "." if self.nested else ""


def detect(payload: Mapping[str, Any], source: str = "the file") -> Detection:
    """The format of a loaded file from its keys alone (never its name), with its networks."""
    container, raw = _unwrap(payload)
    weights: dict[str, Tensor] = {}
    for key, value in raw.items():
        if isinstance(key, str) and isinstance(value, Tensor):
            weights.setdefault(strip_wrappers(key), value)
    networks = find_networks(weights)
    if not networks:
        shown = ", ".join(map(str, list(raw)[:5])) + (", ..." if len(raw) > 5 else "")
        raise SSLBenchError(
            f"{source}: no ResNet or ViT in its keys ({container or 'top level'}: {shown}); read are "
            "sslbench, DINO, iBOT, DINOv2, MoCo v3, torchvision, timm, solo-learn and lightly files"
        )
    for rule in (_sslbench, _student_teacher, _moco_v3, _lightly, _solo_learn):
        found = rule(payload, container, weights, networks)
        if found is not None:
            return found
    return _by_layout(payload, container, weights, networks)


def _unwrap(payload: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    if isinstance(payload.get("method"), Mapping) and "format" in payload:
        return "method", payload["method"]
    nested = [name for name in ("student", "teacher") if isinstance(payload.get(name), Mapping)]
    if nested:
        return "student/teacher", {f"{name}.{key}": v for name in nested for key, v in payload[name].items()}
    for name in ("state_dict", "model"):
        if isinstance(payload.get(name), Mapping):
            return name, payload[name]
    return "", payload


def _heads(keys: Iterable[str]) -> set[str]:
    return {key.split(".", 1)[0] for key in keys}


def _only(parts: Mapping[str, str]) -> str | None:
    return next(iter(parts)) if len(parts) == 1 else None


def _sslbench(payload, container, weights, networks) -> Detection | None:
    """sslbench: ``backbone.pt`` is ``Backbone.state_dict()`` (``model.*``); a training checkpoint keeps
    ``method.state_dict()``, whose backbones are ``<owner>backbone.model.*`` (``teacher_``, ``target_``,
    ``key_``); the evaluated one is the teacher where there is one (``Method.eval_backbone``)."""
    if container == "" and set(networks) == {"model."} and all(key.startswith("model.") for key in weights):
        return Detection(
            "sslbench backbone.pt", "every key starts with model.", weights, networks, {"": "model."}, ""
        )
    method_dict = container == "" and all(prefix.endswith("backbone.model.") for prefix in networks)
    if container != "method" and not method_dict:  # ``torch.save(method.state_dict())`` counts too
        return None
    parts = {
        (prefix.removesuffix("backbone.model.").rstrip("_") or "backbone"): prefix
        for prefix in networks
        if prefix.endswith("backbone.model.")
    }
    aliases = {"student": "backbone", "online": "backbone"}
    aliases |= {alias: name for name in parts if name != "backbone" for alias in ("momentum", "ema")}
    where = "" if method_dict else "'format' and 'method' with "
    evidence = where + "*, ".join(parts.values()) + "*"
    default = "teacher" if "teacher" in parts else "backbone"
    chosen = {prefix: networks[prefix] for prefix in parts.values()}
    return Detection("sslbench checkpoint", evidence, weights, chosen, parts, default, aliases)


def _student_teacher(payload, container, weights, networks) -> Detection | None:
    """DINO's and iBOT's ``save_dict`` (main_dino.py, main_ibot.py: ``student``, ``teacher``, each a
    MultiCropWrapper, ``module.`` under DDP) and DINOv2's ``teacher_checkpoint.pth`` (train.py ``do_test``)
    or ``model`` of its training checkpoint (``student.backbone``, ``teacher.backbone``); their
    evaluations read the teacher (``--checkpoint_key teacher``)."""
    in_model = container == "model" and any(
        prefix.startswith(("student.", "teacher.")) for prefix in networks
    )
    if container != "student/teacher" and not in_model:
        return None
    parts = {prefix.split(".", 1)[0]: prefix for prefix in networks}
    inner = [key[len(prefix) :] for prefix in parts.values() for key in weights if key.startswith(prefix)]
    if "ibot_loss" in payload or any(k.endswith("masked_embed") or ".last_layer2." in k for k in weights):
        name, evidence = "iBOT", "'student'/'teacher' with masked_embed, last_layer2 or ibot_loss"
    elif in_model or _heads(k.partition(".")[2] for k in weights) & {"dino_head", "ibot_head"}:
        name, evidence = "DINOv2", "'teacher' with backbone.*, dino_head.*, ibot_head.*"
    elif signals := dinov2_signals(inner):
        name, evidence = "DINOv2", f"'teacher'/'student' with backbone {', '.join(signals)}"
    else:
        name, evidence = "DINO checkpoint", "'student'/'teacher' with (module.)backbone.* keys"
    default = "teacher" if "teacher" in parts else "student"
    aliases = {"online": "student", "momentum": "teacher", "ema": "teacher"}
    aliases = {alias: name for alias, name in aliases.items() if name in parts}
    return Detection(name, evidence, weights, networks, parts, default, aliases, nested=True)


def _moco_v3(payload, container, weights, networks) -> Detection | None:
    """MoCo v3's ``state_dict`` (main_moco.py): ``module.base_encoder`` / ``module.momentum_encoder``,
    whose ``fc`` / ``head`` is the projector, and ``module.predictor``; main_lincls.py reads base_encoder."""
    if "base_encoder." not in networks:
        return None
    parts = {
        prefix.rstrip("."): prefix for prefix in networks if prefix in ("base_encoder.", "momentum_encoder.")
    }
    aliases = {alias: "base_encoder" for alias in ("online", "student", "base")}
    aliases |= {alias: "momentum_encoder" for alias in _EMA_ALIASES if "momentum_encoder" in parts}
    evidence = "'state_dict' with module.base_encoder.* (and module.momentum_encoder.*, module.predictor.*)"
    chosen = {prefix: networks[prefix] for prefix in parts.values()}
    return Detection("MoCo v3", evidence, weights, chosen, parts, "base_encoder", aliases)


def _lightly(payload, container, weights, networks) -> Detection | None:
    """lightly's examples: a LightningModule with ``backbone`` (``nn.Sequential`` of a torchvision ResNet,
    or a timm / torchvision ViT in ``backbone.vit`` of its masked wrappers), ``backbone_momentum`` or
    ``student_backbone`` / ``teacher_backbone``, and ``projection_head`` / ``prediction_head``."""
    heads = _heads(weights)
    lightly_layout = any(
        kind == "lightly-resnet" or prefix.endswith(".vit.") for prefix, kind in networks.items()
    )
    if not (lightly_layout or heads & _LIGHTLY_MARKS):
        return None
    parts = {prefix.split(".", 1)[0]: prefix for prefix in reversed(networks)}
    default = next((name for name in _LIGHTLY_NETWORKS if name in parts), _only(parts))
    online = "backbone" if "backbone" in parts else "student_backbone"
    ema = "teacher_backbone" if "teacher_backbone" in parts else "backbone_momentum"
    aliases = {alias: online for alias in ("online", "student") if online in parts}
    aliases |= {alias: ema for alias in _EMA_ALIASES if ema in parts}
    layout = "nn.Sequential ResNet" if lightly_layout else "named modules"
    evidence = f"{', '.join(sorted(heads & (_LIGHTLY_MARKS | {'backbone'})))} ({layout})"
    return Detection("lightly", evidence, weights, networks, parts, default, aliases)


def _solo_learn(payload, container, weights, networks) -> Detection | None:
    """solo-learn's Lightning ``state_dict`` (solo/methods/base.py): ``backbone`` (older: ``encoder``), an
    online ``classifier``, ``projector``, and ``momentum_backbone``; main_linear.py reads ``backbone``."""
    heads = _heads(weights)
    names = {prefix.split(".", 1)[0] for prefix in networks}
    if not (heads & _SOLO_MARKS and names & {"backbone", "encoder"}):
        return None
    online = "backbone" if "backbone" in names else "encoder"
    parts = {prefix.split(".", 1)[0]: prefix for prefix in reversed(networks)}
    aliases = {alias: online for alias in ("online", "student")}
    ema = f"momentum_{online}"
    aliases |= {alias: ema for alias in _EMA_ALIASES if ema in parts}
    evidence = f"'state_dict' with {online}.* and {', '.join(sorted(heads & _SOLO_MARKS))}.*"
    return Detection("solo-learn", evidence, weights, networks, parts, online, aliases)


def _by_layout(payload, container, weights, networks) -> Detection:
    """One network: its format from its own keys; several with no rule: the caller chooses."""
    if len(networks) > 1:
        parts = {prefix.rstrip("."): prefix for prefix in networks}
        return Detection("state dict", f"networks at {', '.join(parts)}", weights, networks, parts, None)
    prefix, kind = next(iter(networks.items()))
    inner = [key[len(prefix) :] for key in weights if key.startswith(prefix)]
    where = f" under {container!r}" if container else ""
    if signals := dinov2_signals(inner):
        name, evidence = "DINOv2", f"{', '.join(signals)}{where}"
    elif "masked_embed" in inner:
        name, evidence = "iBOT", f"masked_embed{where}"
    elif kind == "torchvision-vit":
        name, evidence = "torchvision ViT", f"class_token, conv_proj, encoder.layers{where}"
    elif kind == "lightly-resnet":
        name, evidence = "lightly", f"nn.Sequential ResNet keys 0.weight, 4.0.conv1.weight{where}"
    elif kind == "resnet":
        classifier = " and fc" if "fc.weight" in inner else ""
        name, evidence = "torchvision/timm ResNet", f"conv1, bn1, layer1-4{classifier}{where}"
    elif container == "state_dict" and {"arch", "version"} <= set(payload):
        name, evidence = "timm state dict", "'arch', 'version', 'state_dict' (timm's train.py checkpoint)"
    elif container == "state_dict":
        name, evidence = "iBOT", "'state_dict' of plain ViT keys (iBOT's released backbones)"
    elif container == "model" and "head.weight" not in inner:
        name, evidence = "MoCo v3", "'model' of plain ViT keys, no head (moco-v3 convert_to_deit.py)"
    elif "head.weight" in inner:
        name, evidence = "timm state dict", f"ViT keys with a classifier head{where}"
    else:
        name, evidence = "DINO backbone", f"plain ViT keys, no classifier (DINO's released backbones){where}"
    part = prefix.rstrip(".")
    return Detection(name, evidence, weights, networks, {part: prefix}, part)
