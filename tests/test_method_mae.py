"""MAE's own behaviour: the encoder sees only the kept patches, the loss only the removed ones, the
decoder predicts every patch's pixels, masks repeat from the run's seed, and ResNets are refused."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from sslbench import SSLBenchError, Step, TrainContext, create_backbone, random_keep
from sslbench.method.registry import get_method
from sslbench.training.optim import parameter_groups

SIZE = 32
SMALL = {"decoder_dim": 64, "decoder_depth": 1}


def build(arch: str = "vit_tiny16", image_size: int = SIZE, seed: int = 0, **options):
    torch.manual_seed(seed)
    method_cls = get_method("mae")
    backbone = create_backbone(arch, image_size)
    return method_cls(backbone, method_cls.Config(**options), TrainContext(2, 1, 10, image_size))


def images(batch: int = 4, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def step(iteration: int = 0) -> Step:
    return Step(iteration, 0, 1, 10)


def masks_of(method, iteration: int = 0, batch: int = 4, num_patches: int = 64):
    """The masks of the method's step ``iteration``."""
    generator = method.mask_generator(torch.device("cpu"), iteration)
    return random_keep(batch, num_patches, method.config.mask_ratio, generator)


def test_encoder_sees_exactly_the_kept_patches():
    method = build(**SMALL)
    seen = []
    method.backbone.model.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    calls = []
    forward_tokens = method.backbone.forward_tokens

    def recording(x, **kwargs):
        calls.append(kwargs["keep"])
        return forward_tokens(x, **kwargs)

    method.backbone.forward_tokens = recording
    torch.manual_seed(3)
    method.training_step([images()], torch.zeros(4), step())
    keep = int(64 * (1 - 0.75))  # 8x8 patches of 4 px at 32 px, 75% removed
    assert seen == [torch.Size([4, 1 + keep, method.backbone.feat_dim])]  # class token + visible only
    ids_keep, mask = masks_of(method, 0)
    assert torch.equal(calls[0], ids_keep)
    for row, kept in zip(mask, ids_keep, strict=True):  # the kept indices are the mask's zeros
        assert set(kept.tolist()) == set(torch.nonzero(row == 0).flatten().tolist())
        assert int(row.sum()) == 64 - keep


def _loss_with_prediction_offset(method, x, where: torch.Tensor) -> torch.Tensor:
    """The step's loss after adding 5 to the decoder's predictions of the patches in ``where`` (B, N)."""

    def offset(_module, _inputs, output):
        return output + 5.0 * where.unsqueeze(-1).to(output.dtype)

    handle = method.decoder.register_forward_hook(offset)
    try:
        torch.manual_seed(5)
        with torch.no_grad():
            return method.training_step([x], torch.zeros(4), step()).loss
    finally:
        handle.remove()


def test_loss_is_on_removed_patches_only():
    method = build(**SMALL)
    method.eval()
    x = images()
    _, mask = masks_of(method, 0)
    base = _loss_with_prediction_offset(method, x, torch.zeros_like(mask))
    visible_changed = _loss_with_prediction_offset(method, x, 1 - mask)
    removed_changed = _loss_with_prediction_offset(method, x, mask)
    torch.testing.assert_close(visible_changed, base, rtol=0, atol=0)
    assert removed_changed > base + 1.0
    # The loss is the mean over removed patches of the per-patch error against normalised pixels.
    with torch.no_grad():
        ids_keep, _ = masks_of(method, 0)
        cls, visible = method.backbone.forward_tokens(x, keep=ids_keep)
        pred = method.decoder(cls, visible, ids_keep, (8, 8))
        patches = x.reshape(4, 3, 8, 4, 8, 4).permute(0, 2, 4, 3, 5, 1).reshape(4, 64, 48)
        target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(base, per_patch[mask.bool()].mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("image_size", "patch"), [(32, 4), (224, 16)])
def test_decoder_predicts_every_patch_pixels(image_size, patch):
    method = build(image_size=image_size, **SMALL)
    assert method.backbone.patch_size == patch
    side = image_size // patch
    ids_keep, _ = random_keep(2, side * side, 0.75, torch.Generator().manual_seed(0))
    with torch.no_grad():
        cls, visible = method.backbone.forward_tokens(images(2, image_size), keep=ids_keep)
        pred = method.decoder(cls, visible, ids_keep, (side, side))
    assert pred.shape == (2, side * side, patch * patch * 3)  # 48 values per patch at 32 px


def test_masks_repeat_from_the_run_seed_and_step():
    """Masks come from the method's MaskSeed (drawn when built, after the run's seed) and the step: the
    same run seed gives the same masks, each step new ones, and a checkpoint carries the seed."""
    first, again, other_seed = build(**SMALL), build(**SMALL), build(seed=1, **SMALL)
    assert torch.equal(masks_of(first)[0], masks_of(again)[0])
    assert not torch.equal(masks_of(first)[0], masks_of(other_seed)[0])  # another run seed
    assert not torch.equal(masks_of(first, 0)[0], masks_of(first, 1)[0])  # new masks every step
    x = images()
    loss = first.training_step([x], torch.zeros(4), step(3)).loss
    assert torch.equal(again.training_step([x], torch.zeros(4), step(3)).loss, loss)
    other_seed.load_state_dict(first.state_dict())  # a resumed run: the seed comes with the weights
    assert torch.equal(masks_of(other_seed, 3)[0], masks_of(first, 3)[0])
    assert torch.equal(other_seed.training_step([x], torch.zeros(4), step(3)).loss, loss)


def test_mae_refuses_a_resnet_in_one_line():
    with pytest.raises(SSLBenchError) as error:
        build("resnet18")
    assert "ViTs only" in str(error.value) and "resnet18" in str(error.value)
    assert "\n" not in str(error.value)
    assert get_method("mae").families == ("vit",)


def test_decoder_sizes_resolve_by_image_size_and_encoder():
    small = build()
    assert (small.config.decoder_dim, small.config.decoder_depth, small.config.decoder_heads) == (192, 4, 6)
    assert small.resolved_options()["decoder_dim"] == 192  # recorded as used
    large = build(image_size=224, decoder_dim=512)
    assert (large.config.decoder_depth, large.config.decoder_heads) == (8, 16)  # the reference's decoder
    block = large.decoder.blocks[0]
    assert block.linear1.out_features == 4 * 512 and block.norm1.eps == 1e-6 and block.norm_first
    assert build(decoder_depth=2).config.decoder_depth == 2  # an explicit value is kept
    with pytest.raises(SSLBenchError, match="mask_ratio"):
        get_method("mae").Config(mask_ratio=1.0)


def test_sincos_positions_match_the_reference_layout():
    """util/pos_embed.py: the first half encodes the column, the second the row, [sin, cos] each."""
    positions = sys.modules[get_method("mae").__module__].sincos_positions(8, (2, 3))
    assert positions.shape == (6, 8)
    row, col = 1, 2  # raster index 5; w = (1, 1/100) for a quarter of 2 channels
    expected = [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
    expected += [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]
    torch.testing.assert_close(positions[row * 3 + col], torch.tensor(expected))
    method = build(**SMALL)
    assert "positions" not in dict(method.decoder.named_parameters())  # fixed, never trained


def test_decoder_and_mask_token_train_and_the_encoder_is_evaluated():
    method = build(**SMALL)
    method.training_step([images()], torch.zeros(4), step()).loss.backward()
    assert method.decoder.mask_token.grad is not None and method.decoder.mask_token.grad.abs().sum() > 0
    assert all(p.grad is not None for p in method.decoder.parameters())
    assert method.eval_backbone() is method.backbone and method.momentum_pairs() == []
    # The reference decays the mask token (timm's add_weight_decay skips 1-D tensors and biases only).
    decayed = {id(p) for p in parameter_groups([method])[0]["params"]}
    assert id(method.decoder.mask_token) in decayed
    recipe = method.view_recipe()
    assert (recipe.kind, recipe.global_scale, recipe.num_views) == ("crop_flip", (0.2, 1.0), 1)


def test_paper_recipe_is_the_reference_command():
    mae = get_method("mae")
    assert mae.paper_recipe("resnet", 224, 800) is None
    train = mae.paper_recipe("vit", 224, 800).train
    assert (train["optimizer"], train["lr"], train["min_lr"], train["warmup_epochs"]) == (
        "adamw",
        1.5e-4,
        0.0,
        40,
    )
    assert (train["weight_decay"], train["weight_decay_end"], train["clip_grad"]) == (0.05, 0.05, 0.0)


def test_decoder_block_computes_what_the_reference_timm_block_does():
    """models_mae.py's decoder blocks: timm ``Block(dim, heads, 4, qkv_bias=True, LayerNorm eps 1e-6)``."""
    from functools import partial

    from timm.models.vision_transformer import Block

    method = build(decoder_dim=64, decoder_depth=1, decoder_heads=4)
    ours = method.decoder.blocks[0].eval()
    reference = Block(64, 4, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            source = {
                "attn.qkv.weight": "self_attn.in_proj_weight",
                "attn.qkv.bias": "self_attn.in_proj_bias",
                "attn.proj.weight": "self_attn.out_proj.weight",
                "attn.proj.bias": "self_attn.out_proj.bias",
                "mlp.fc1.weight": "linear1.weight",
                "mlp.fc1.bias": "linear1.bias",
                "mlp.fc2.weight": "linear2.weight",
                "mlp.fc2.bias": "linear2.bias",
            }.get(name, name)
            parameter.copy_(ours.get_parameter(source))
        x = torch.randn(2, 65, 64)
        torch.testing.assert_close(ours(x), reference.eval()(x), rtol=1e-5, atol=1e-5)
