"""Backbones from timm, adapted to small images, behind one small interface.

Every method sees a ``Backbone``: ``forward`` gives the pooled feature (the ViT class token after the
final norm, or the ResNet global average pool) and ``forward_eval`` gives the features the evaluators
use. The feature dimension comes from the backbone, never from a method's own guess.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import timm
import torch
from torch import Tensor, nn

from sslbench.base.errors import SSLBenchError, unknown_name_message
from sslbench.base.small_images import SMALL_IMAGE_MAX
from sslbench.models.vit import create_vit

VIT_LINEAR_BLOCKS = 4  # DINO's linear protocol for ViT-S: class tokens of the last 4 blocks


@dataclass(frozen=True)
class ArchSpec:
    timm_name: str
    family: str  # "resnet" | "vit"
    description: str


ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec("resnet18", "resnet", "ResNet-18 (11M), CPU-friendly"),
    "resnet50": ArchSpec("resnet50", "resnet", "ResNet-50 (23M), the papers' ResNet"),
    "vit_tiny16": ArchSpec("vit_tiny_patch16_224", "vit", "ViT-Ti/16 (5M), CPU-friendly"),
    "vit_s16": ArchSpec("vit_small_patch16_224", "vit", "ViT-S/16 (21M), the DINO paper's ViT-S"),
    "vit_b16": ArchSpec("vit_base_patch16_224", "vit", "ViT-B/16 (85M)"),
}


def arch_spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise SSLBenchError(unknown_name_message("arch", arch, ARCHS))
    return ARCHS[arch]


def effective_patch_size(arch: str, image_size: int) -> int | None:
    """ViTs keep an 8x8 patch grid on small global crops (patch 4 at 32 px); 16 otherwise."""
    if arch_spec(arch).family != "vit":
        return None
    return max(1, image_size // 8) if image_size <= SMALL_IMAGE_MAX else 16


class Backbone(nn.Module):
    """A timm model with the feature dimension and evaluation features it provides."""

    def __init__(self, arch: str, model: nn.Module, patch_size: int | None) -> None:
        super().__init__()
        self.arch = arch
        self.family = arch_spec(arch).family
        self.model = model
        self.patch_size = patch_size
        self.feat_dim: int = model.num_features
        blocks = VIT_LINEAR_BLOCKS if self.family == "vit" else 1
        self.linear_dim: int = self.feat_dim * blocks
        self.linear_features_description = (
            f"class tokens of the last {VIT_LINEAR_BLOCKS} blocks"
            if self.family == "vit"
            else "global average pool"
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def forward_tokens(
        self,
        images: Tensor,
        mask: Tensor | None = None,
        mask_token: Tensor | None = None,
        keep: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(pooled, patches)``: for a ViT the class token and the patch tokens (B, N, C) after the final
        norm, optionally with masked patches replaced by ``mask_token`` (iBOT) or only the ``keep``
        patches (MAE); for a ResNet the pooled feature and the last feature map as (B, H*W, C) tokens."""
        if self.family == "vit":
            return self.model.forward_tokens(images, mask=mask, mask_token=mask_token, keep=keep)
        if mask is not None or keep is not None:
            raise SSLBenchError(f"{self.arch} has no patch tokens to mask: masking needs a ViT")
        feature_map = self.model.forward_features(images)
        return self.model.forward_head(feature_map), feature_map.flatten(2).transpose(1, 2)

    def grid(self, image_size: int) -> tuple[int, int]:
        """The patch grid of a square ``image_size`` crop (padded to whole patches), for masks."""
        if self.patch_size is None:
            raise SSLBenchError(f"{self.arch} has no patch grid: masking needs a ViT")
        side = -(-image_size // self.patch_size)
        return side, side

    def forward_eval(self, images: Tensor) -> dict[str, Tensor]:
        """``knn``: the pooled feature; ``linear``: DINO's linear-protocol feature (one pass for both)."""
        if self.family != "vit":
            pooled = self.model(images)
            return {"knn": pooled, "linear": pooled}
        layers = self.model.forward_intermediates(
            images,
            indices=VIT_LINEAR_BLOCKS,
            return_prefix_tokens=True,
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        cls_tokens = [prefix[:, 0] for _, prefix in layers]
        return {"knn": cls_tokens[-1], "linear": torch.cat(cls_tokens, dim=-1)}


def create_backbone(arch: str, image_size: int, drop_path_rate: float = 0.0) -> Backbone:
    """Build ``arch`` for images of ``image_size`` px, randomly initialised (no weights are fetched).

    Small images: ResNets take the CIFAR stem (3x3 conv, stride 1, no max-pool; SimCLR, Chen et al. 2020,
    Appendix B.9)
    and ViTs a patch size that keeps an 8x8 grid. ViTs resample position embeddings for crops of
    another size as the DINO reference does (``sslbench.models.vit``), which multi-crop's local crops
    need, and pad a crop whose side is not a multiple of the patch (``dynamic_img_pad``; e.g. 41 px
    local crops of 96 px images).
    """
    spec = arch_spec(arch)
    patch_size = effective_patch_size(arch, image_size)
    if spec.family == "vit":
        model = create_vit(
            spec.timm_name,
            num_classes=0,
            img_size=image_size,
            patch_size=patch_size,
            dynamic_img_size=True,
            dynamic_img_pad=True,
            drop_path_rate=drop_path_rate,
        )
    else:
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
        if image_size <= SMALL_IMAGE_MAX:
            model.conv1 = nn.Conv2d(
                3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False
            )
            model.maxpool = nn.Identity()
    return Backbone(arch, model, patch_size)


def set_fused_attention(module: nn.Module, enabled: bool) -> None:
    """Pick timm's attention kernel in every ViT block under ``module``: fused (PyTorch's
    ``scaled_dot_product_attention``, flash on CUDA) or matmul, softmax, matmul. The same maths; only
    the speed differs by device and precision (``sslbench.training.step.fused_attention_for``)."""
    for submodule in module.modules():
        if hasattr(submodule, "fused_attn"):
            submodule.fused_attn = enabled


def multicrop_forward(
    backbone: Callable[[Tensor], Tensor],
    crops: Sequence[Tensor],
    head: Callable[[Tensor], Tensor] | None = None,
    per_view_batch_norm: bool = False,
) -> list[Tensor]:
    """One output per crop, in order.

    By default one backbone forward per run of same-resolution crops and one head forward for all, as
    the DINO and SimCLR references batch them: that is what makes multi-crop affordable. With
    ``per_view_batch_norm`` each crop goes through on its own, so BatchNorm statistics are per view, as
    in the BYOL reference.
    """
    if per_view_batch_norm:
        return [head(backbone(crop)) if head is not None else backbone(crop) for crop in crops]
    outputs: list[Tensor] = []
    start = 0
    while start < len(crops):
        end = start
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        outputs.append(backbone(torch.cat(list(crops[start:end]))))
        start = end
    features = torch.cat(outputs)
    if head is not None:
        features = head(features)
    return list(features.chunk(len(crops)))
