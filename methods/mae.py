"""MAE: masked autoencoders.

He, Chen, Xie, Li, Dollar & Girshick 2022, "Masked Autoencoders Are Scalable Vision Learners",
arXiv 2111.06377 (reference: facebookresearch/mae, ``models_mae.py``).

- Masking (Sec. 3): per image, a uniform random 75% of the patches is removed (``random_keep``); the
  encoder (the backbone's ViT, with its own position embeddings) runs on the class token and the visible
  25% only (``forward_tokens(keep=...)``).
- Decoder (Sec. 3, ``forward_decoder``): a Linear from the encoder width to the decoder width, a shared
  learnable mask token at every removed position, fixed 2-D sin-cos position embeddings, pre-norm
  Transformer blocks (MLP ratio 4, LayerNorm eps 1e-6), a LayerNorm and a Linear to ``p * p * 3`` pixel
  values per patch. It only exists for pre-training; the encoder alone is evaluated.
  Sizes (Table 1a-b): 512 wide, 8 deep for ViT-B and up; never wider than the encoder, and 4 deep on
  small images, where there are 64 patches of 48 values to predict.
- Loss (Sec. 3, "Reconstruction target"): ``mean_{i removed} ||x_hat_i - t_i||^2 / (p * p * 3)`` with
  ``t_i`` patch ``i`` normalised by its own mean and variance (``norm_pix``, the paper's Table 1d best;
  ``sslbench.losses.mae_loss``); visible patches carry no loss.
- Views: one crop (RandomResizedCrop, scale 0.2-1, bicubic) and a flip, no colour (Table 1e).
- Evaluation reads the encoder (no EMA): k-NN on the class token after the final norm, the linear probe
  on the class tokens of the last 4 blocks (sslbench's protocol). MAE's own probe (``main_linprobe.py``)
  uses the last block's class token after the final norm, through a BatchNorm without affine parameters.
- Kept from sslbench's shared ViT rather than the reference's encoder: learned position embeddings
  (the reference fixes them to 2-D sin-cos) and timm's initialisation (the reference: Xavier-uniform),
  so every method trains the same backbone. Weight decay as the reference's: all but biases and norms,
  the mask token included (timm's ``add_weight_decay`` without a skip list).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslbench import (
    SMALL_IMAGE_MAX,
    Backbone,
    MaskSeed,
    Method,
    PaperRecipe,
    SSLBenchError,
    Step,
    StepOutput,
    TrainContext,
    ViewRecipe,
    mae_loss,
    random_keep,
    rank_rows,
    register_method,
    world_size,
)

# --recipe paper: PRETRAIN.md's command (--blr 1.5e-4 --weight_decay 0.05 --warmup_epochs 40
# --norm_pix_loss --mask_ratio 0.75), main_pretrain.py's min_lr 0, a per-iteration half-cosine
# (util/lr_sched.py), no clipping. Its scale (batch 4096, 800 / 1600 epochs) is the preset's. The
# reference's AdamW betas (0.9, 0.95) are not a recipe key: the runner's AdamW keeps (0.9, 0.999).
VIT_RECIPE = PaperRecipe(
    "vit",
    "the MAE PRETRAIN.md command: AdamW, --blr 1.5e-4 --weight_decay 0.05 --warmup_epochs 40 "
    "--norm_pix_loss --mask_ratio 0.75 (main_pretrain.py's min_lr 0)",
    train={
        "optimizer": "adamw",
        "lr": 1.5e-4,
        "min_lr": 0.0,
        "warmup_epochs": 40,
        "weight_decay": 0.05,
        "weight_decay_end": 0.05,
        "momentum": 0.9,
        "clip_grad": 0.0,
        "drop_path_rate": 0.0,  # models_mae.py's blocks have no stochastic depth
    },
    options={"mask_ratio": 0.75, "norm_pix": True},
)

_REFERENCE_DECODER = (512, 8)  # width, depth: mae_vit_{base,large,huge}_*_dec512d8b
_SMALL_DECODER_DEPTH = 4
_HEAD_DIM = 32  # the reference's 512 wide / 16 heads
_LN_EPS = 1e-6


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    norm_pix: bool = True  # per-patch normalised pixel targets (PRETRAIN.md's --norm_pix_loss)
    decoder_dim: int | None = None  # None: min(512, encoder width); the reference's 512 for ViT-B and up
    decoder_depth: int | None = None  # None: 8 (the reference) above 64 px, 4 on small images
    decoder_heads: int | None = None  # None: decoder_dim // 32 (the reference's 16 heads of 32)
    crop_scale: tuple[float, float] = (0.2, 1.0)

    def __post_init__(self) -> None:  # caught when the config is read, before anything trains
        if not 0.0 <= self.mask_ratio < 1.0:
            raise SSLBenchError(f"mae.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SSLBenchError(f"mae.{name} must be >= 1, got {value}")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise SSLBenchError(f"mae.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")


def sincos_positions(dim: int, grid: tuple[int, int]) -> Tensor:
    """MAE's fixed 2-D sin-cos embeddings (``util/pos_embed.py``), ``(rows * cols, dim)`` in raster order.

    The first half of the channels encodes the column and the second half the row, each as
    ``[sin(pos w_k), cos(pos w_k)]`` with ``w_k = 10000^(-k / (dim / 4))``, ``k < dim / 4``.
    """
    if dim % 4:
        raise SSLBenchError(f"mae: sin-cos position embeddings need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )

    def encode(position: Tensor) -> Tensor:
        angles = position.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class MAEDecoder(nn.Module):
    """The reference's decoder: encoder tokens -> ``(B, N, patch_values)`` predictions for every patch.

    Its blocks are ``nn.TransformerEncoderLayer`` in pre-norm form (``norm_first``, exact GELU, MLP
    ratio 4, LayerNorm eps 1e-6, biases everywhere, no dropout): the same computation as timm's ``Block``
    with ``qkv_bias=True`` that the reference uses.
    """

    def __init__(
        self, encoder_dim: int, dim: int, depth: int, heads: int, patch_values: int, grid: tuple[int, int]
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.grid = grid
        self.register_buffer("positions", sincos_positions(dim, grid), persistent=False)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                heads,
                4 * dim,
                dropout=0.0,
                activation="gelu",
                layer_norm_eps=_LN_EPS,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.pred = nn.Linear(dim, patch_values)
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference's ``initialize_weights``: Xavier-uniform Linears (the attention's joint qkv
        matrix already is, as one (3d, d) matrix), zero biases, mask token N(0, 0.02^2)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, cls: Tensor, visible: Tensor, ids_keep: Tensor, grid: tuple[int, int]) -> Tensor:
        """``cls`` (B, C) and ``visible`` (B, K, C) encoder outputs, ``ids_keep`` (B, K) their patch
        indices: the mask token fills every other position, then positions, blocks and prediction."""
        x = self.embed(torch.cat([cls.unsqueeze(1), visible], dim=1))
        batch, _, dim = x.shape
        positions = self.positions if grid == self.grid else sincos_positions(dim, grid).to(x.device)
        index = ids_keep.unsqueeze(-1).expand(-1, -1, dim)
        tokens = self.mask_token.to(x.dtype).expand(batch, grid[0] * grid[1], dim).scatter(1, index, x[:, 1:])
        x = torch.cat([x[:, :1], tokens + positions.to(x.dtype)], dim=1)  # class token: a zero position
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


@register_method("mae")
class MAE(Method):
    paper = "He et al. 2022, arXiv 2111.06377"
    Config = MAEConfig
    families = ("vit",)

    @classmethod
    def paper_recipe(cls, family: str, image_size: int, epochs: int) -> PaperRecipe | None:
        return VIT_RECIPE if family == "vit" else None

    def __init__(self, backbone: Backbone, config: MAEConfig, context: TrainContext) -> None:
        super().__init__(backbone, config, context)
        if backbone.family != "vit":
            raise SSLBenchError(
                f"mae trains ViTs only, not {backbone.arch}: it masks patches, which a ResNet has not"
            )
        self.mask_seed = MaskSeed()  # masks alike on every rank and on resume
        patch = backbone.patch_size
        if context.image_size % patch:
            raise SSLBenchError(f"mae: {context.image_size} px is not a whole number of {patch} px patches")
        small = context.image_size <= SMALL_IMAGE_MAX
        if config.decoder_dim is None:
            config.decoder_dim = min(_REFERENCE_DECODER[0], backbone.feat_dim)
        if config.decoder_depth is None:
            config.decoder_depth = _SMALL_DECODER_DEPTH if small else _REFERENCE_DECODER[1]
        if config.decoder_heads is None:
            config.decoder_heads = max(1, config.decoder_dim // _HEAD_DIM)
        if config.decoder_dim % config.decoder_heads:
            raise SSLBenchError(
                f"mae.decoder_dim {config.decoder_dim} is not a multiple of decoder_heads "
                f"{config.decoder_heads}"
            )
        self.decoder = MAEDecoder(
            backbone.feat_dim,
            config.decoder_dim,
            config.decoder_depth,
            config.decoder_heads,
            patch * patch * 3,
            backbone.grid(context.image_size),
        )

    def view_recipe(self) -> ViewRecipe:
        return ViewRecipe("crop_flip", global_scale=tuple(self.config.crop_scale))

    def mask_generator(self, device: torch.device, iteration: int = 0) -> torch.Generator:
        """The step's mask generator on ``device`` (``MaskSeed``: the same on every rank, again on resume,
        never waiting for a GPU)."""
        return self.mask_seed.generator(iteration, device)

    def training_step(self, views: list[Tensor], labels: Tensor, step: Step) -> StepOutput:
        images = views[0]
        grid = self.backbone.grid(images.shape[-1])
        generator = self.mask_generator(images.device, step.iteration)
        # Drawn for the global batch, then this rank's images' rows: 2 ranks mask as 1 process does
        everyone = random_keep(
            images.shape[0] * world_size(), grid[0] * grid[1], self.config.mask_ratio, generator
        )
        ids_keep, mask = (rank_rows(part) for part in everyone)
        cls, visible = self.backbone.forward_tokens(images, keep=ids_keep)
        pred = self.decoder(cls, visible, ids_keep, grid)
        loss = mae_loss(pred, images, mask, self.backbone.patch_size, norm_pix=self.config.norm_pix)
        return StepOutput(loss, embeddings=cls)
