"""sslbench: a pluggable benchmark for self-supervised visual representation learning.

The public API, the one place a method file imports from: subclass ``Method``, decorate it with
``register_method``, and build it from the shared pieces listed in ``__all__`` (backbones and their
multi-crop forward, heads, EMA teachers, view recipes, losses, schedules, collectives, diagnostics).
"""

from sslbench import legacy_paths
from sslbench.base.collectives import all_reduce_mean, gather_with_grad, rank, rank_rows, world_size
from sslbench.base.errors import SSLBenchError
from sslbench.base.schedules import cosine_schedule, linear_warmup_then_constant
from sslbench.base.small_images import SMALL_IMAGE_MAX
from sslbench.data.augment import ViewRecipe, multi_crop, two_views
from sslbench.data.masking import MaskSeed, block_mask, ibot_masks, random_keep
from sslbench.evaluation.diagnostics import entropy
from sslbench.losses import (
    barlow_twins_loss,
    byol_loss,
    codes_with_queue,
    dino_loss,
    dino_mse_loss,
    dino_pairs,
    enqueue,
    ibot_patch_loss,
    info_nce_with_queue,
    koleo_loss,
    mae_loss,
    moco_v3_loss,
    nt_xent_loss,
    patchify,
    sinkhorn_knopp,
    swav_loss,
    updated_center,
    updated_patch_center,
    vicreg_loss,
)
from sslbench.method import (
    Method,
    NoOptions,
    PaperRecipe,
    ParameterRule,
    Step,
    StepOutput,
    TrainContext,
    get_method,
    list_methods,
    load_plugin_file,
    nearest_epochs,
    register_method,
)
from sslbench.models.backbones import ARCHS, Backbone, create_backbone, multicrop_forward
from sslbench.models.batch_norm_groups import (
    GroupedBatchNorm,
    batch_norm_groups,
    contiguous_groups,
    strided_groups,
    use_grouped_batch_norm,
)
from sslbench.models.heads import DINOHead, MLPHead, init_linears
from sslbench.models.momentum import ema_copy, ema_update

__version__ = "0.1.0"

__all__ = [
    # the method interface and the registry
    "Method",
    "NoOptions",
    "PaperRecipe",
    "ParameterRule",
    "nearest_epochs",
    "Step",
    "StepOutput",
    "TrainContext",
    "get_method",
    "list_methods",
    "load_plugin_file",
    "register_method",
    # networks
    "ARCHS",
    "Backbone",
    "DINOHead",
    "MLPHead",
    "init_linears",
    "create_backbone",
    "ema_copy",
    "ema_update",
    "multicrop_forward",
    "GroupedBatchNorm",
    "batch_norm_groups",
    "contiguous_groups",
    "strided_groups",
    "use_grouped_batch_norm",
    # views
    "SMALL_IMAGE_MAX",
    "ViewRecipe",
    "multi_crop",
    "two_views",
    "block_mask",
    "MaskSeed",
    "ibot_masks",
    "random_keep",
    # losses
    "byol_loss",
    "dino_loss",
    "dino_mse_loss",
    "dino_pairs",
    "nt_xent_loss",
    "updated_center",
    "barlow_twins_loss",
    "codes_with_queue",
    "enqueue",
    "ibot_patch_loss",
    "info_nce_with_queue",
    "koleo_loss",
    "mae_loss",
    "moco_v3_loss",
    "patchify",
    "sinkhorn_knopp",
    "swav_loss",
    "updated_patch_center",
    "vicreg_loss",
    # schedules, collectives over ranks, diagnostics, errors
    "SSLBenchError",
    "all_reduce_mean",
    "cosine_schedule",
    "entropy",
    "gather_with_grad",
    "linear_warmup_then_constant",
    "rank",
    "rank_rows",
    "world_size",
]

legacy_paths.install()


def __getattr__(name: str) -> object:
    """``sslbench.augment`` and the other flat-layout modules, reached as attributes: a warning, then the
    moved module."""
    return legacy_paths.moved_attribute(name)
