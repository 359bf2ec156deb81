"""Masked-modelling losses and masks checked against independent implementations written from the papers.

- iBOT: Zhou et al. 2022 (arXiv 2111.07832), Eq. 2 (L_MIM) and the patch-center update.
- KoLeo: Sablayrolles et al. 2019 (arXiv 1806.03198), as DINOv2 (arXiv 2304.07193) uses it.
- MAE: He et al. 2022 (arXiv 2111.06377), Sec. 3 (normalised pixels, loss on removed patches only).
- Masks: BEiT / iBOT / DINOv2 block masks, DINOv2's per-batch rule, MAE's random shuffle.
"""

from __future__ import annotations

import math

import pytest
import torch

from sslbench.data.masking import _add_block, block_mask, ibot_masks, random_keep
from sslbench.losses.masked_modelling import (
    ibot_patch_loss,
    koleo_loss,
    mae_loss,
    patchify,
    updated_patch_center,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64) * scale


# --------------------------------------------------------------------------------------------------------
# iBOT
# --------------------------------------------------------------------------------------------------------


def _softmax(v: torch.Tensor) -> torch.Tensor:
    e = torch.exp(v - v.max())
    return e / e.sum()


def _paper_mim(student, teacher, masks, center, tps, tpt) -> torch.Tensor:
    """Eq. 2 written per crop, per image, per masked patch: -sum_i m_i P_t(u_i)^T log P_s(u_hat_i), divided
    by the image's count of masked patches (at least 1), averaged over images and then over crops."""
    crop_losses = []
    for s, t, m in zip(student, teacher, masks, strict=True):
        image_losses = []
        for b in range(s.shape[0]):
            total = torch.zeros((), dtype=F64)
            for i in range(s.shape[1]):
                if m[b, i]:
                    p_t = _softmax((t[b, i].detach() - center[0, 0]) / tpt)
                    p_s = _softmax(s[b, i] / tps)
                    total = total - (p_t * torch.log(p_s)).sum()
            image_losses.append(total / max(1, int(m[b].sum())))
        crop_losses.append(sum(image_losses) / len(image_losses))
    return sum(crop_losses) / len(crop_losses)


def _mim_inputs(seed: int, crops: int = 2, b: int = 3, n: int = 6, k: int = 5):
    gen = _gen(seed)
    student = [_randn(gen, b, n, k, scale=2.0).requires_grad_() for _ in range(crops)]
    teacher = [_randn(gen, b, n, k, scale=2.0).requires_grad_() for _ in range(crops)]
    masks = [torch.rand(b, n, generator=gen) < 0.5 for _ in range(crops)]
    masks[0][0] = False  # an image with no masked patch
    masks[1][1] = True  # an image with every patch masked
    center = _randn(gen, 1, 1, k, scale=0.5)
    return student, teacher, masks, center


def test_ibot_patch_loss_matches_eq2() -> None:
    for seed in range(3):
        student, teacher, masks, center = _mim_inputs(seed)
        got = ibot_patch_loss(student, teacher, masks, center, 0.1, 0.04)
        want = _paper_mim(student, teacher, masks, center, 0.1, 0.04)
        assert got.dtype == F64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_ibot_patch_loss_image_without_mask_contributes_zero() -> None:
    student, teacher, masks, center = _mim_inputs(5)
    base = ibot_patch_loss(student, teacher, masks, center, 0.1, 0.07)
    # Changing every output of the unmasked image (crop 0, image 0) leaves the loss as it is ...
    s2 = [s.detach().clone() for s in student]
    t2 = [t.detach().clone() for t in teacher]
    s2[0][0] += 10.0 * torch.randn(s2[0][0].shape, generator=_gen(1), dtype=F64)
    t2[0][0] -= 10.0 * torch.randn(t2[0][0].shape, generator=_gen(2), dtype=F64)
    torch.testing.assert_close(ibot_patch_loss(s2, t2, masks, center, 0.1, 0.07), base.detach())
    # ... and it still counts in the mean over images: the crop's loss is the others' sum over B.
    crop0 = ibot_patch_loss(student[:1], teacher[:1], masks[:1], center, 0.1, 0.07)
    others = ibot_patch_loss([student[0][1:]], [teacher[0][1:]], [masks[0][1:]], center, 0.1, 0.07)
    torch.testing.assert_close(crop0, others * 2 / 3)


def test_ibot_patch_loss_gradient_reaches_only_the_student_masked_patches() -> None:
    student, teacher, masks, center = _mim_inputs(7)
    center.requires_grad_()
    ibot_patch_loss(student, teacher, masks, center, 0.1, 0.04).backward()
    assert all(t.grad is None for t in teacher)
    assert center.grad is None
    for s, m in zip(student, masks, strict=True):
        per_patch = s.grad.abs().sum(dim=-1)
        assert torch.all(per_patch[~m] == 0)
        assert torch.all(per_patch[m] > 0)


def test_updated_patch_center_matches_the_mean_of_image_means() -> None:
    gen = _gen(11)
    teacher = [_randn(gen, 4, 7, 5) for _ in range(2)]
    center = _randn(gen, 1, 1, 5)
    image_means = [t[b].sum(dim=0) / t.shape[1] for t in teacher for b in range(t.shape[0])]
    batch_center = sum(image_means) / len(image_means)
    got = updated_patch_center(center, teacher, 0.9)
    assert got.shape == (1, 1, 5)
    torch.testing.assert_close(got[0, 0], 0.9 * center[0, 0] + 0.1 * batch_center)
    torch.testing.assert_close(updated_patch_center(center, teacher, 1.0), center)


# --------------------------------------------------------------------------------------------------------
# KoLeo
# --------------------------------------------------------------------------------------------------------


def _brute_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """-1/n sum_i log(min_{j != i} ||x_i/|x_i| - x_j/|x_j||| + eps), every pair measured."""
    u = [row / math.sqrt(float((row * row).sum())) for row in x]
    terms = []
    for i in range(len(u)):
        nearest = min(math.sqrt(float(((u[i] - u[j]) ** 2).sum())) for j in range(len(u)) if j != i)
        terms.append(math.log(nearest + eps))
    return torch.tensor(-sum(terms) / len(terms), dtype=F64)


def test_koleo_matches_brute_force() -> None:
    for seed in range(3):
        x = _randn(_gen(seed), 16, 8, scale=3.0)
        got = koleo_loss(x)
        assert got.dtype == F64
        torch.testing.assert_close(got, _brute_koleo(x), rtol=1e-6, atol=1e-6)


def test_koleo_is_fp32_for_half_inputs_and_scale_invariant() -> None:
    x = _randn(_gen(3), 12, 6)
    half = koleo_loss(x.to(torch.bfloat16))
    assert half.dtype == torch.float32
    torch.testing.assert_close(
        half.double(), _brute_koleo(x.to(torch.bfloat16).double()), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(koleo_loss(x * 7.0), koleo_loss(x))
    x.requires_grad_()
    koleo_loss(x).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------
# MAE
# --------------------------------------------------------------------------------------------------------


def _loop_patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """Patch (i, j) in raster order, its values ordered by (row r, column q, channel c)."""
    b, c, height, width = images.shape
    rows = []
    for n in range(b):
        patches = []
        for i in range(height // p):
            for j in range(width // p):
                values = [
                    images[n, ch, i * p + r, j * p + q] for r in range(p) for q in range(p) for ch in range(c)
                ]
                patches.append(torch.stack(values))
        rows.append(torch.stack(patches))
    return torch.stack(rows)


def _paper_mae(pred, images, mask, p, norm_pix) -> torch.Tensor:
    target = _loop_patchify(images, p)
    if norm_pix:
        d = target.shape[-1]
        mean = target.sum(dim=-1, keepdim=True) / d
        var = ((target - mean) ** 2).sum(dim=-1, keepdim=True) / (d - 1)  # unbiased, as torch.var
        target = (target - mean) / torch.sqrt(var + 1e-6)
    total, count = torch.zeros((), dtype=F64), 0
    for n in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            if mask[n, i] == 1:
                total = total + ((pred[n, i] - target[n, i]) ** 2).sum() / pred.shape[-1]
                count += 1
    return total / count


def _mae_inputs(seed: int):
    gen = _gen(seed)
    images = _randn(gen, 2, 3, 8, 12)  # non-square: 2 x 3 patches of 4 x 4
    pred = _randn(gen, 2, 6, 48)
    mask = (torch.rand(2, 6, generator=gen) < 0.6).to(F64)
    mask[:, 0] = 1.0
    mask[:, 1] = 0.0
    return pred, images, mask


def test_patchify_layout() -> None:
    images = _randn(_gen(0), 2, 3, 8, 12)
    torch.testing.assert_close(patchify(images, 4), _loop_patchify(images, 4))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_paper(norm_pix: bool) -> None:
    for seed in range(2):
        pred, images, mask = _mae_inputs(seed)
        got = mae_loss(pred, images, mask, 4, norm_pix=norm_pix)
        torch.testing.assert_close(got, _paper_mae(pred, images, mask, 4, norm_pix), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(mae_loss(pred, images, mask.bool(), 4, norm_pix=norm_pix), got)


def test_mae_loss_ignores_visible_patches() -> None:
    pred, images, mask = _mae_inputs(4)
    base = mae_loss(pred, images, mask, 4)
    changed = pred.clone()
    changed[:, 1] += 100.0  # patch 1 is visible in every image
    torch.testing.assert_close(mae_loss(changed, images, mask, 4), base)
    changed[:, 0] += 1.0  # patch 0 is removed in every image
    assert mae_loss(changed, images, mask, 4) > base + 1e-3


# --------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_block_mask_reaches_about_the_ratio(ratio: float) -> None:
    gen = _gen(0)
    counts = torch.tensor([int(block_mask((14, 14), ratio, gen).sum()) for _ in range(60)], dtype=F64)
    target = int(196 * ratio)
    assert counts.max() <= target  # a block never overshoots
    assert abs(counts.mean() / 196 - ratio) < 0.01 and counts.min() >= target - 4
    assert block_mask((14, 14), 0.0, gen).sum() == 0


def test_block_mask_is_made_of_blocks_and_reproducible() -> None:
    masks = [block_mask((14, 14), 0.4, _gen(seed)) for seed in range(20)]
    assert all(m.shape == (14, 14) and m.dtype == torch.bool for m in masks)
    torch.testing.assert_close(block_mask((14, 14), 0.4, _gen(3)), masks[3])
    assert any(not torch.equal(masks[0], m) for m in masks[1:])
    # Blocks, not scattered patches: nearly every masked patch has a masked 4-neighbour.
    for m in masks:
        padded = torch.nn.functional.pad(m.float()[None, None], (1, 1, 1, 1))[0, 0]
        neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
        assert float((neighbours[m] > 0).float().mean()) > 0.9


def test_one_block_is_a_rectangle_within_bounds() -> None:
    gen = _gen(1)
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(100):
        mask = torch.zeros(14, 14, dtype=torch.bool)
        added = _add_block(mask, 40, 4, log_aspect, gen)
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert added == int(mask.sum()) == h * w  # its bounding box, filled
        assert 1 <= added <= 40 and h < 14 and w < 14


def test_ibot_masks_half_the_images_with_ratios_across_the_range() -> None:
    all_ratios = []
    first_half_only = True
    for seed in range(8):
        masks = ibot_masks(32, (14, 14), generator=_gen(seed))
        assert masks.shape == (32, 196) and masks.dtype == torch.bool
        ratios = masks.float().mean(dim=1)
        masked = ratios > 0
        assert int(masked.sum()) == 16
        assert float(ratios.max()) <= 0.5
        assert float(ratios[masked].min()) >= 0.08  # ratio 0.1 of 196 patches, a block or two short at most
        sorted_ratios = ratios[masked].sort().values
        assert float(sorted_ratios[0]) < 0.15 and float(sorted_ratios[-1]) > 0.42  # spread over the range
        first_half_only &= bool(masked[:16].all())
        all_ratios.append(ratios[masked])
    assert not first_half_only  # the order is shuffled
    assert abs(float(torch.cat(all_ratios).mean()) - 0.3) < 0.03
    torch.testing.assert_close(
        ibot_masks(32, (14, 14), generator=_gen(2)), ibot_masks(32, (14, 14), generator=_gen(2))
    )
    assert ibot_masks(8, (14, 14), masked_fraction=0.0, generator=_gen(0)).sum() == 0


@pytest.mark.parametrize(("n", "ratio"), [(196, 0.75), (10, 0.7), (49, 0.5), (16, 0.0)])
def test_random_keep_matches_mae(n: int, ratio: float) -> None:
    ids_keep, mask = random_keep(4, n, ratio, _gen(9))
    keep = int(n * (1 - ratio))
    assert ids_keep.shape == (4, keep) and mask.shape == (4, n)
    assert torch.all(mask.sum(dim=1) == n - keep)
    assert torch.all(torch.gather(mask, 1, ids_keep) == 0)  # kept patches are 0, every other one 1
    assert all(len(set(row.tolist())) == keep for row in ids_keep)
    # The reference order: the patches with the smallest noise values, in ascending noise order.
    noise = torch.rand(4, n, generator=_gen(9))
    for b in range(4):
        order = sorted(range(n), key=lambda i: float(noise[b, i]))[:keep]
        assert ids_keep[b].tolist() == order
    again = random_keep(4, n, ratio, _gen(9))
    assert torch.equal(again[0], ids_keep) and torch.equal(again[1], mask)


def test_random_keep_depends_on_the_seed() -> None:
    assert not torch.equal(random_keep(2, 196, 0.75, _gen(0))[0], random_keep(2, 196, 0.75, _gen(1))[0])
