"""Masked-modelling losses: iBOT's patch-token self-distillation (Zhou et al. 2022, arXiv 2111.07832),
DINOv2's KoLeo regulariser (Oquab et al. 2023, arXiv 2304.07193) and MAE's pixel reconstruction
(He et al. 2022, arXiv 2111.06377).

Every loss is computed in at least fp32: the teacher's patch softmax is as sharp as DINO's (T = 0.04-0.07),
and the log of a nearest-neighbour distance is as sensitive to rounding as the distance is small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.base.collectives import all_reduce_mean
from sslbench.base.errors import SSLBenchError
from sslbench.losses.precision import at_least_fp32

_PDIST_EPS = 1e-8  # added to the difference inside the distance, as torch's PairwiseDistance(eps=1e-8)
_PIX_VAR_EPS = 1e-6  # MAE's normalised-pixel target: (x - mean) / sqrt(var + 1e-6)


def ibot_patch_loss(
    student_patches: list[Tensor],
    teacher_patches: list[Tensor],
    masks: list[Tensor],
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
) -> Tensor:
    """iBOT's masked image modelling term, Eq. 2 (``L_MIM``) and ``iBOTLoss`` of the reference code.

    For each global crop ``v`` the teacher sees the whole crop and the student the same crop with the
    patches of ``masks[v]`` replaced by a mask token; the loss is
    ``-sum_i m_i P_t(u_i)^T log P_s(u_hat_i) / max(1, sum_i m_i)`` per image, averaged over the images and
    then over the crops. Dividing by each image's own count (not the batch's) weighs every image alike
    however many patches it hides; an image without a masked patch contributes 0.

    ``student_patches`` / ``teacher_patches``: one ``(B, N, K)`` tensor per global crop; ``masks``: one bool
    ``(B, N)`` per crop (True = masked); ``center``: ``(1, 1, K)``. The teacher side is centred, sharpened
    and carries no gradient.
    """
    if not (len(student_patches) == len(teacher_patches) == len(masks)) or not masks:
        raise SSLBenchError(
            f"ibot_patch_loss needs one student, teacher and mask tensor per global crop; got "
            f"{len(student_patches)}, {len(teacher_patches)} and {len(masks)}"
        )
    per_crop = []
    for student, teacher, mask in zip(student_patches, teacher_patches, masks, strict=True):
        with torch.no_grad():
            q = F.softmax((at_least_fp32(teacher.detach()) - center) / teacher_temp, dim=-1)
        logp = F.log_softmax(at_least_fp32(student) / student_temp, dim=-1)
        cross_entropy = torch.sum(-q * logp, dim=-1)  # (B, N)
        mask = mask.to(torch.bool)
        # ``where`` rather than a product: a non-finite value on a visible patch stays out of the loss.
        masked_sum = torch.where(mask, cross_entropy, torch.zeros_like(cross_entropy)).sum(dim=-1)
        per_image = masked_sum / mask.sum(dim=-1).clamp(min=1).to(masked_sum.dtype)
        per_crop.append(per_image.mean())
    return torch.stack(per_crop).mean()


@torch.no_grad()
def updated_patch_center(center: Tensor, teacher_patches: list[Tensor], momentum: float) -> Tensor:
    """iBOT's patch centering (``center2`` of ``iBOTLoss.update_center``):
    ``C' <- m C' + (1 - m) mean_images(mean_patches(g_t(u)))``, over every global crop of every rank.

    Each image's patches are averaged first, so every image counts alike whatever its patch count.
    Returns ``(1, 1, K)``.
    """
    patches = at_least_fp32(torch.cat(teacher_patches))  # (crops * B, N, K)
    batch_center = all_reduce_mean(patches.mean(dim=1, keepdim=True).mean(dim=0, keepdim=True))
    return center * momentum + batch_center * (1.0 - momentum)


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """The Kozachenko-Leonenko entropy estimator as a regulariser (Sablayrolles et al. 2019,
    arXiv 1806.03198; DINOv2 Sec. 4): ``-1/n sum_i log(d_{n,i} + eps)``, where ``d_{n,i}`` is the distance
    from the L2-normalised ``x_i`` to its nearest other row.

    Pushing nearest neighbours apart spreads the features uniformly over the batch. On unit vectors the
    nearest neighbour is the largest dot product, found with one matrix product (self excluded). ``x`` is
    ``(B, D)`` of one rank, as in DINOv2 (which applies it per global crop); computed in fp32 or above
    with autocast off, since ``log`` of a small distance magnifies rounding.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise SSLBenchError(f"koleo_loss needs a (B, D) tensor with B >= 2; got shape {tuple(x.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(at_least_fp32(x), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-1.0)  # a unit vector's dot product with any other is >= -1
            nearest = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=_PDIST_EPS)
        return -torch.log(distances + eps).mean()


def patchify(images: Tensor, patch: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, (H/p)(W/p), p*p*C)``, patches in raster order and each patch's values in
    (row, column, channel) order: the layout of MAE's ``patchify``, which the decoder predicts."""
    if images.ndim != 4 or images.shape[2] % patch or images.shape[3] % patch:
        raise SSLBenchError(
            f"patchify needs (B, C, H, W) images with H and W multiples of the patch size {patch}; "
            f"got shape {tuple(images.shape)}"
        )
    b, c, height, width = images.shape
    h, w = height // patch, width // patch
    x = images.reshape(b, c, h, patch, w, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, h * w, patch * patch * c)


def mae_loss(pred: Tensor, images: Tensor, mask: Tensor, patch: int, norm_pix: bool = True) -> Tensor:
    """MAE's reconstruction loss (Sec. 3, "Reconstruction target"; ``forward_loss``): the mean squared
    error per patch, averaged over the removed patches only (``mask`` 1 = removed, ``(B, N)``).

    Visible patches are left out because reconstructing what the encoder saw teaches nothing (the paper
    reports lower accuracy when they are included). With ``norm_pix`` the target is each patch normalised
    by its own mean and (unbiased) variance, ``(x - mean) / sqrt(var + 1e-6)``, which sharpens local
    contrast and improves the representation (Table 1d). ``pred``: ``(B, N, p*p*C)``.
    """
    target = patchify(at_least_fp32(images), patch)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + _PIX_VAR_EPS).sqrt()
    if pred.shape != target.shape:
        raise SSLBenchError(f"mae_loss: predictions {tuple(pred.shape)} != targets {tuple(target.shape)}")
    per_patch = ((at_least_fp32(pred) - target) ** 2).mean(dim=-1)  # (B, N)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp(min=1.0)
