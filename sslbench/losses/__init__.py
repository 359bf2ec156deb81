"""The papers' loss functions as plain functions of tensors, one file per family, each tested against
the paper's pseudo-code.

Methods call these; nothing here knows about backbones, views or the runner. Where a paper computes a
quantity over the whole batch (DINO's center, SimCLR's negatives), it is computed over every rank of a
distributed run (``sslbench.base.collectives``); in one process those calls are the identity.
"""

from sslbench.losses.bootstrap import byol_loss
from sslbench.losses.contrastive import nt_xent_loss
from sslbench.losses.distillation import dino_loss, dino_mse_loss, dino_pairs, updated_center
from sslbench.losses.masked_modelling import (
    ibot_patch_loss,
    koleo_loss,
    mae_loss,
    patchify,
    updated_patch_center,
)
from sslbench.losses.momentum_contrast import enqueue, info_nce_with_queue, moco_v3_loss
from sslbench.losses.redundancy_reduction import barlow_twins_loss, vicreg_loss
from sslbench.losses.swapped_prediction import codes_with_queue, sinkhorn_knopp, swav_loss

__all__ = [
    "barlow_twins_loss",
    "byol_loss",
    "codes_with_queue",
    "dino_loss",
    "dino_mse_loss",
    "dino_pairs",
    "enqueue",
    "ibot_patch_loss",
    "info_nce_with_queue",
    "koleo_loss",
    "mae_loss",
    "moco_v3_loss",
    "nt_xent_loss",
    "patchify",
    "sinkhorn_knopp",
    "swav_loss",
    "updated_center",
    "updated_patch_center",
    "vicreg_loss",
]
