"""timm's VisionTransformer with the DINO reference's position embeddings.

Two details of DINO's ``vision_transformer.py`` (Caron et al. 2021, arXiv 2104.14294) differ from timm's
defaults, and both are kept here because the published numbers came from them:

- **Resampling for other crop sizes** (``interpolate_pos_encoding``): the stored grid of patch
  embeddings is resized bicubically by the *scale factor* ``(g + 0.1) / sqrt(N)``, ``g`` the new grid
  side and ``N`` the stored number of patches, without antialiasing; timm resizes to the target size
  with antialiasing. On multi-crop's local crops (6x6 from 14x14, 4x4 from 8x8) the two disagree by
  60-80% of the embeddings' norm, so the student would see other positions than the reference's does.
- **Initialisation of the class token**: truncated normal, std 0.02 (timm: normal, std 1e-6).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

# (embed_dim, depth, num_heads) of timm's registered ViTs that sslbench builds, by timm name.
VIT_SHAPES: dict[str, tuple[int, int, int]] = {
    "vit_tiny_patch16_224": (192, 12, 3),
    "vit_small_patch16_224": (384, 12, 6),
    "vit_base_patch16_224": (768, 12, 12),
}


def resample_position_embeddings(patch_embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
    """DINO's ``interpolate_pos_encoding`` on the patch part ``(1, N, C)`` of the embeddings: bicubic by
    the scale factor ``(g + 0.1) / sqrt(N)`` per side (the 0.1 keeps the floor of the output size at
    ``g``, dino issue 8), no antialiasing; unchanged when the grid is the stored one."""
    count, dim = patch_embeddings.shape[1], patch_embeddings.shape[2]
    side = int(math.sqrt(count))
    if side * side != count:
        raise ValueError(f"position embeddings of {count} patches are not a square grid")
    if grid == (side, side):
        return patch_embeddings
    square = patch_embeddings.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(
        square.float(),
        scale_factor=((grid[0] + 0.1) / side, (grid[1] + 0.1) / side),
        mode="bicubic",
    ).to(patch_embeddings.dtype)
    if tuple(resized.shape[-2:]) != grid:  # the reference asserts the same
        raise ValueError(f"resampled a {side}x{side} grid to {tuple(resized.shape[-2:])}, wanted {grid}")
    return resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)


class DINOPositionViT(VisionTransformer):
    """A timm ViT (class token, no register tokens, position embedding for the class token too, as
    DINO's) whose position embeddings are resampled and initialised as in the DINO reference."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.cls_token is None or self.reg_token is not None or self.no_embed_class:
            raise ValueError(
                "DINOPositionViT needs a class token and neither register tokens nor no_embed_class"
            )
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _pos_embed(self, x: Tensor) -> Tensor:
        """Tokens ``(B, H, W, C)`` after the patch embedding -> class token prepended, positions added."""
        batch, height, width, dim = x.shape
        class_position, patch_positions = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        positions = torch.cat(
            [class_position, resample_position_embeddings(patch_positions, (height, width))], dim=1
        )
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], dim=1)
        return self.pos_drop(tokens + positions)

    def forward_tokens(
        self,
        images: Tensor,
        mask: Tensor | None = None,
        mask_token: Tensor | None = None,
        keep: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The class token and the patch tokens after the final norm, for methods that use patches.

        ``mask`` (B, N) bool with ``mask_token`` (C,): masked patch embeddings are replaced by the token
        before the positions are added (iBOT's ``masked_embed``). ``keep`` (B, K) patch indices: only
        those patches (with their positions) enter the blocks (MAE's encoder on the visible patches).
        """
        x = self.patch_embed(images)  # (B, H, W, C): dynamic_img_size
        if mask is not None:
            if mask_token is None:
                raise ValueError("a mask needs the mask_token that replaces the masked patches")
            grid_mask = mask.reshape(x.shape[:3]).unsqueeze(-1)
            x = torch.where(grid_mask, mask_token.to(x.dtype), x)
        x = self._pos_embed(x)
        if keep is not None:
            patches = torch.gather(x[:, 1:], 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], patches], dim=1)
        x = self.norm_pre(self.patch_drop(x))
        x = self.norm(self.blocks(x))
        return x[:, 0], x[:, 1:]


def create_vit(timm_name: str, **kwargs) -> DINOPositionViT:
    """The registered timm ViT ``timm_name`` (same modules and parameter names) as a ``DINOPositionViT``."""
    embed_dim, depth, num_heads = VIT_SHAPES[timm_name]
    return DINOPositionViT(embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)
