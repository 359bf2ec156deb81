"""Backbones: small-image adaptation, feature dimensions, evaluation features and multi-crop batching.

All architectures build in well under 2 s each on one CPU thread, so every arch in ARCHS is built
(at 32 px); the larger ones only get a one-image forward.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sslbench import SSLBenchError
from sslbench.base.small_images import SMALL_IMAGE_MAX
from sslbench.data.augment import crop_sizes
from sslbench.models.backbones import (
    ARCHS,
    VIT_LINEAR_BLOCKS,
    Backbone,
    arch_spec,
    create_backbone,
    effective_patch_size,
    multicrop_forward,
)

KNOWN_FEAT_DIMS = {"resnet18": 512, "resnet50": 2048, "vit_tiny16": 192, "vit_s16": 384, "vit_b16": 768}
RESNETS = [a for a, spec in ARCHS.items() if spec.family == "resnet"]
VITS = [a for a, spec in ARCHS.items() if spec.family == "vit"]


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit_tiny() -> Backbone:
    torch.manual_seed(0)
    return create_backbone("vit_tiny16", 32).eval()


@pytest.fixture(scope="module")
def resnet18() -> Backbone:
    torch.manual_seed(0)
    return create_backbone("resnet18", 32).eval()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_builds_at_32px_with_the_models_feat_dim(arch):
    backbone = create_backbone(arch, 32)
    assert isinstance(backbone, Backbone)
    assert backbone.arch == arch and backbone.family == arch_spec(arch).family
    assert backbone.feat_dim == backbone.model.num_features
    if arch in KNOWN_FEAT_DIMS:
        assert backbone.feat_dim == KNOWN_FEAT_DIMS[arch]
    blocks = VIT_LINEAR_BLOCKS if backbone.family == "vit" else 1
    assert backbone.linear_dim == blocks * backbone.feat_dim
    backbone.eval()
    with torch.no_grad():
        out = backbone(_images(1, 3, 32, 32))
    assert out.shape == (1, backbone.feat_dim)


@pytest.mark.parametrize("arch", RESNETS)
def test_resnet_cifar_stem_on_small_images(arch):
    for size in (32, SMALL_IMAGE_MAX):
        model = create_backbone(arch, size).model
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert model.conv1.padding == (1, 1) and model.conv1.in_channels == 3
        assert isinstance(model.maxpool, nn.Identity)
    model = create_backbone(arch, 224).model
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert effective_patch_size(arch, 32) is None


def test_resnet18_feature_map_is_not_downsampled_by_the_stem(resnet18):
    # CIFAR stem: 32 px -> 4x4 at the last stage (stride 8 overall), not 1x1.
    with torch.no_grad():
        fmap = resnet18.model.forward_features(_images(1, 3, 32, 32))
    assert fmap.shape[-2:] == (4, 4)


@pytest.mark.parametrize("arch", VITS)
def test_vit_patch_size_rule(arch):
    assert effective_patch_size(arch, 32) == 4
    assert effective_patch_size(arch, 64) == 8
    assert effective_patch_size(arch, 96) == 16
    assert effective_patch_size(arch, 224) == 16


def test_vit_tiny_patch_embed_follows_image_size(vit_tiny):
    assert vit_tiny.patch_size == 4
    assert vit_tiny.model.patch_embed.patch_size == (4, 4)
    assert vit_tiny.model.patch_embed.grid_size == (8, 8)
    big = create_backbone("vit_tiny16", 224)
    assert big.patch_size == 16
    assert big.model.patch_embed.patch_size == (16, 16)
    assert big.model.patch_embed.grid_size == (14, 14)


def test_vit_tiny_accepts_local_crops(vit_tiny):
    with torch.no_grad():
        out = vit_tiny(_images(2, 3, 16, 16))
        out_eval = vit_tiny.forward_eval(_images(2, 3, 16, 16))
    assert out.shape == (2, 192) and torch.isfinite(out).all()
    assert out_eval["knn"].shape == (2, 192)


@pytest.mark.parametrize("size", [32, 64, 96, 160, 224])
def test_vit_accepts_both_crop_sizes_of_its_image_size(size):
    backbone = create_backbone("vit_tiny16", size).eval()
    with torch.no_grad():
        for crop in crop_sizes(size):
            assert backbone(_images(1, 3, crop, crop)).shape == (1, backbone.feat_dim)


def test_forward_eval_vit(vit_tiny):
    x = _images(3, 3, 32, 32, seed=1)
    model = vit_tiny.model
    captured: list[torch.Tensor] = []
    hooks = [
        blk.register_forward_hook(lambda _m, _i, out: captured.append(out))
        for blk in model.blocks[-VIT_LINEAR_BLOCKS:]
    ]
    try:
        with torch.no_grad():
            feats = vit_tiny.forward_eval(x)
            pooled = vit_tiny(x)
    finally:
        for hook in hooks:
            hook.remove()
    d = vit_tiny.feat_dim
    assert feats["knn"].shape == (3, d)
    assert feats["linear"].shape == (3, VIT_LINEAR_BLOCKS * d) == (3, vit_tiny.linear_dim)
    torch.testing.assert_close(feats["knn"], pooled, rtol=0, atol=1e-5)
    # The linear feature: the class token of each of the last 4 blocks after the final norm, in order
    # (the hooks fired for the plain forward as well; its block outputs are the second half).
    blocks = captured[-VIT_LINEAR_BLOCKS:]
    with torch.no_grad():
        expected = torch.cat([model.norm(out)[:, 0] for out in blocks], dim=-1)
    torch.testing.assert_close(feats["linear"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(feats["linear"][:, -d:], feats["knn"], rtol=0, atol=1e-5)


def test_forward_eval_resnet(resnet18):
    x = _images(3, 3, 32, 32, seed=2)
    with torch.no_grad():
        feats = resnet18.forward_eval(x)
        pooled = resnet18(x)
    assert feats["knn"].shape == (3, 512)
    assert torch.equal(feats["knn"], feats["linear"])
    torch.testing.assert_close(feats["knn"], pooled, rtol=0, atol=1e-5)
    assert resnet18.linear_dim == resnet18.feat_dim


class _Counting:
    def __init__(self, fn):
        self.fn = fn
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.fn(x)


@pytest.mark.parametrize("arch_fixture", ["vit_tiny", "resnet18"])
def test_multicrop_forward_groups_by_resolution(arch_fixture, request):
    backbone = request.getfixturevalue(arch_fixture)
    crops = [_images(2, 3, 32, 32, seed=i) for i in range(2)] + [
        _images(2, 3, 16, 16, seed=10 + i) for i in range(3)
    ]
    counting = _Counting(backbone)
    with torch.no_grad():
        outputs = multicrop_forward(counting, crops)
        separate = [backbone(c) for c in crops]
    assert counting.shapes == [(4, 3, 32, 32), (6, 3, 16, 16)]
    assert len(outputs) == len(crops)
    for out, ref in zip(outputs, separate, strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_multicrop_forward_head_runs_once_and_order_is_kept(vit_tiny):
    torch.manual_seed(0)
    head = nn.Linear(vit_tiny.feat_dim, 8)
    # Runs of one size are batched together; a size that comes back starts a new run.
    crops = [_images(2, 3, 32, 32, seed=0), _images(2, 3, 16, 16, seed=1), _images(2, 3, 32, 32, seed=2)]
    counting, counting_head = _Counting(vit_tiny), _Counting(head)
    with torch.no_grad():
        outputs = multicrop_forward(counting, crops, counting_head)
        separate = [head(vit_tiny(c)) for c in crops]
    assert counting.shapes == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 32, 32)]
    assert counting_head.shapes == [(6, vit_tiny.feat_dim)]
    assert [o.shape for o in outputs] == [(2, 8)] * 3
    for out, ref in zip(outputs, separate, strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_unknown_arch_suggests_and_lists():
    with pytest.raises(SSLBenchError) as info:
        create_backbone("vit_s17", 32)
    message = str(info.value)
    assert "did you mean 'vit_s16'" in message
    for arch in ARCHS:
        assert arch in message
    with pytest.raises(SSLBenchError, match="unknown arch"):
        effective_patch_size("resnet1", 32)
