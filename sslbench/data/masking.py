"""Which patches a masked-image model hides: BEiT's / iBOT's / DINOv2's block-wise masks, the per-image
masking rule of DINOv2's collate, and MAE's per-sample random shuffle.

Every draw comes from the ``torch.Generator`` passed in, so a seed gives the same masks on any run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sslbench.base.errors import SSLBenchError

_ATTEMPTS = 10  # tries per block before the loop gives up, as the reference MaskingGenerator


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    """A float in ``[low, high]`` (either order, as ``random.uniform``)."""
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An int in ``[low, high]``, both ends included (as ``random.randint``)."""
    return int(torch.randint(low, high + 1, (), generator=generator, device=generator.device))


def _add_block(
    mask: Tensor,
    max_patches: float,
    min_patches: int,
    log_aspect: tuple[float, float],
    generator: torch.Generator,
) -> int:
    """Mask one rectangle of random area in ``[min_patches, max_patches]`` and log-uniform aspect ratio
    that adds between 1 and ``max_patches`` new patches; the number added (0 after ten failed tries)."""
    height, width = mask.shape
    for _ in range(_ATTEMPTS):
        area = _uniform(generator, min_patches, max_patches)
        aspect = math.exp(_uniform(generator, *log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if w < width and h < height:
            top = _randint(generator, 0, height - h)
            left = _randint(generator, 0, width - w)
            added = h * w - int(mask[top : top + h, left : left + w].sum())
            if 0 < added <= max_patches:  # overlapping an earlier block is fine, overshooting is not
                mask[top : top + h, left : left + w] = True
                return added
    return 0


def _block_mask_count(
    grid: tuple[int, int],
    count: int,
    generator: torch.Generator,
    min_patches: int,
    aspect: tuple[float, float],
    max_block: float,
) -> Tensor:
    """Blocks added until ``count`` patches are masked or a block cannot be placed (``MaskingGenerator``)."""
    mask = torch.zeros(grid, dtype=torch.bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    masked = 0
    while masked < count:
        added = _add_block(mask, min(count - masked, max_block), min_patches, log_aspect, generator)
        if added == 0:
            break
        masked += added
    return mask


def block_mask(
    grid: tuple[int, int],
    ratio: float,
    generator: torch.Generator,
    min_patches: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    *,
    max_block_fraction: float = 0.5,
) -> Tensor:
    """BEiT's block-wise mask (Bao et al. 2022, arXiv 2106.08254, Algorithm 1), used by iBOT and DINOv2:
    rectangles added until ``int(ratio * H * W)`` patches are masked, bool ``(H, W)``.

    Hiding contiguous blocks rather than scattered patches keeps a masked patch from being copied from
    its visible neighbours. Each block covers an area drawn in ``[min_patches, remaining]`` (at most
    ``max_block_fraction`` of the grid, DINOv2's training setting) with a log-uniform aspect ratio in
    ``aspect``; a block that would mask nothing new or overshoot the target is redrawn, up to ten times,
    after which the mask is returned short of the target (so the ratio reached is at most ``ratio``).
    """
    if not 0.0 <= ratio <= 1.0:
        raise SSLBenchError(f"block_mask: ratio must be in [0, 1]; got {ratio}")
    count = int(grid[0] * grid[1] * ratio)
    max_block = max_block_fraction * grid[0] * grid[1]  # a float, as the reference's 0.5 * N
    return _block_mask_count(grid, count, generator, min_patches, aspect, max_block)


def ibot_masks(
    batch: int,
    grid: tuple[int, int],
    ratio_range: tuple[float, float] = (0.1, 0.5),
    masked_fraction: float = 0.5,
    *,
    generator: torch.Generator,
    min_patches: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_block_fraction: float = 0.5,
) -> Tensor:
    """Block masks for a batch of global crops by DINOv2's rule (``collate_data_and_cast``), bool
    ``(B, H*W)``.

    Exactly ``int(batch * masked_fraction)`` images are masked (DINOv2's ``mask_probability`` 0.5); the
    ``i``-th of those ``n`` draws its ratio uniformly in ``[r_i, r_{i+1}]`` of ``linspace(*ratio_range,
    n + 1)``, so the ratios cover the range evenly in every batch; the others keep all their patches, and
    the order of the masks is shuffled. iBOT's ``ImageFolderMask`` (``--pred_ratio 0 0.3 --pred_ratio_var
    0 0.2``) gives the same expectation by chance per image: each crop is masked with probability 1/2, with
    a ratio uniform in [0.1, 0.5]. Like DINOv2's collate, ``batch`` counts crops: the two global crops of
    one image are masked independently.
    """
    if not 0.0 <= masked_fraction <= 1.0:
        raise SSLBenchError(f"ibot_masks: masked_fraction must be in [0, 1]; got {masked_fraction}")
    if not 0.0 <= ratio_range[0] <= ratio_range[1] <= 1.0:
        raise SSLBenchError(f"ibot_masks: ratio_range must satisfy 0 <= low <= high <= 1; got {ratio_range}")
    num_patches = grid[0] * grid[1]
    max_block = max_block_fraction * num_patches
    n_masked = int(batch * masked_fraction)
    bounds = torch.linspace(ratio_range[0], ratio_range[1], n_masked + 1, dtype=torch.float64).tolist()
    masks = torch.zeros(batch, num_patches, dtype=torch.bool)
    for i in range(n_masked):
        count = int(num_patches * _uniform(generator, bounds[i], bounds[i + 1]))
        masks[i] = _block_mask_count(grid, count, generator, min_patches, aspect, max_block).flatten()
    order = torch.randperm(batch, generator=generator, device=generator.device).cpu()
    return masks[order]


def random_keep(
    batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """MAE's per-sample random masking (Sec. 3, "Masking"; ``random_masking``): ``(ids_keep, mask)``.

    Each image sorts uniform noise; the patches with the ``int(N * (1 - mask_ratio))`` smallest values
    are kept, in that (random) order: ``ids_keep`` is ``(B, keep)``, the indices the encoder gathers.
    ``mask`` is float ``(B, N)`` in the patches' own order, 1 = removed and 0 = kept, as the loss uses it.
    Sorting noise gives a uniform random subset per image with no Python loop over the batch. Tensors
    are on the generator's device.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise SSLBenchError(f"random_keep: mask_ratio must be in [0, 1); got {mask_ratio}")
    keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch, num_patches, generator=generator, device=generator.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_shuffle[:, :keep], mask


class MaskSeed(nn.Module):
    """Where a method's masks come from: one seed drawn when the method is built (after the run's seed,
    so the same on every rank and in a one-process run) and the step's iteration. Masks drawn for the
    whole global batch from ``generator(iteration)`` and cut by ``rank_rows`` are then the same on 2
    ranks as in 1 process, and a resumed run draws them again exactly: the seed is saved with the
    method's state (``get_extra_state``), not as a tensor, so reading it never waits for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.seed = int(torch.randint(0, 2**62, ()))

    def generator(self, iteration: int, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device).manual_seed(self.seed + iteration)

    def get_extra_state(self) -> dict[str, int]:
        return {"seed": self.seed}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
