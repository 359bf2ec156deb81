"""ViT position embeddings as the DINO reference resamples and initialises them.

The reference below is transcribed from facebookresearch/dino ``vision_transformer.py``
(``VisionTransformer.interpolate_pos_encoding``), on the image tensor's (w, h) = dims (2, 3) as there.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from sslbench.models.backbones import ARCHS, create_backbone
from sslbench.models.vit import VIT_SHAPES, resample_position_embeddings

VITS = [arch for arch, spec in ARCHS.items() if spec.family == "vit"]


def reference_interpolate_pos_encoding(pos_embed: torch.Tensor, w: int, h: int, patch: int) -> torch.Tensor:
    npatch = (w // patch) * (h // patch)
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // patch
    h0 = h // patch
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def _positions_added(model: torch.nn.Module, rows: int, cols: int) -> torch.Tensor:
    """What the model adds to zero patch tokens of a ``rows x cols`` grid, class token removed."""
    zeros = torch.zeros(1, rows, cols, model.embed_dim)
    with torch.no_grad():
        tokens = model._pos_embed(zeros)
    return tokens - torch.cat([model.cls_token, torch.zeros(1, rows * cols, model.embed_dim)], dim=1)


@pytest.mark.parametrize(
    ("image_size", "crop_hw"),
    [(32, (16, 16)), (32, (24, 16)), (224, (96, 96)), (224, (160, 112)), (224, (224, 224))],
)
def test_crops_get_the_reference_position_embeddings(image_size, crop_hw):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny16", image_size).model
    patch = model.patch_embed.patch_size[0]
    expected = reference_interpolate_pos_encoding(model.pos_embed.detach(), crop_hw[0], crop_hw[1], patch)
    got = _positions_added(model, crop_hw[0] // patch, crop_hw[1] // patch)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    if crop_hw != (image_size, image_size):  # timm's own resampling is far from it: the test can tell
        timm_model = timm.create_model(
            "vit_tiny_patch16_224",
            num_classes=0,
            img_size=image_size,
            patch_size=patch,
            dynamic_img_size=True,
        )
        timm_model.pos_embed.data.copy_(model.pos_embed.detach())
        timm_model.cls_token.data.copy_(model.cls_token.detach())
        timm_got = _positions_added(timm_model, crop_hw[0] // patch, crop_hw[1] // patch)
        relative = (timm_got - expected).norm() / expected.norm()
        assert relative > 0.1


def test_the_forward_passes_use_the_reference_resampling():
    """The training forward and the evaluation features both go through the resampled positions."""
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny16", 32).eval()
    crop = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = (backbone(crop), backbone.forward_eval(crop)["linear"])
        last_patch = backbone.model.pos_embed.shape[1] - 1
        # A change to the stored 8x8 grid's corner reaches the 4x4 crop only through the resampling
        backbone.model.pos_embed[:, last_patch] += 1.0
        after = (backbone(crop), backbone.forward_eval(crop)["linear"])
    for old, new in zip(before, after, strict=True):
        assert not torch.allclose(old, new)


def test_the_stored_grid_is_used_as_it_is():
    embeddings = torch.randn(1, 64, 8)
    assert resample_position_embeddings(embeddings, (8, 8)) is embeddings
    with pytest.raises(ValueError, match="not a square grid"):
        resample_position_embeddings(torch.randn(1, 60, 8), (4, 4))


@pytest.mark.parametrize("arch", VITS)
def test_vits_have_timms_modules_and_the_reference_class_token_init(arch):
    torch.manual_seed(0)
    ours = create_backbone(arch, 224).model
    theirs = timm.create_model(ARCHS[arch].timm_name, pretrained=False, num_classes=0)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert ours.embed_dim == VIT_SHAPES[ARCHS[arch].timm_name][0]
    std = ours.cls_token.std().item()
    assert 0.015 < std < 0.025  # trunc-normal 0.02 (DINO), not timm's normal 1e-6


def test_forward_tokens_matches_the_forward_and_applies_masks_and_keep():
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny16", 32).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cls, patches = backbone.forward_tokens(images)
        torch.testing.assert_close(cls, backbone(images), rtol=0, atol=1e-5)
        assert patches.shape == (2, 64, backbone.feat_dim) and backbone.grid(32) == (8, 8)
        # Masking every patch with the token: the result cannot depend on the image any more
        token = torch.randn(backbone.feat_dim)
        everything = torch.ones(2, 64, dtype=torch.bool)
        masked_cls, _ = backbone.forward_tokens(images, mask=everything, mask_token=token)
        torch.testing.assert_close(masked_cls[0], masked_cls[1], rtol=0, atol=1e-5)
        none = torch.zeros(2, 64, dtype=torch.bool)
        torch.testing.assert_close(backbone.forward_tokens(images, none, token)[0], cls, rtol=0, atol=1e-6)
        # Keeping all patches in order is the full forward; keeping some gives that many tokens
        order = torch.arange(64).expand(2, -1)
        torch.testing.assert_close(backbone.forward_tokens(images, keep=order)[0], cls, rtol=0, atol=1e-5)
        assert backbone.forward_tokens(images, keep=order[:, :16])[1].shape == (2, 16, backbone.feat_dim)
    resnet = create_backbone("resnet18", 32).eval()
    with torch.no_grad():
        pooled, grid_tokens = resnet.forward_tokens(images)
    torch.testing.assert_close(pooled, resnet(images), rtol=0, atol=1e-5)
    assert grid_tokens.shape == (2, 16, 512)
