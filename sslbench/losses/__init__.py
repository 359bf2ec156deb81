"""The papers' loss functions as plain functions of tensors, one file per family, each tested against
the paper's pseudo-code.

Methods call these; nothing here knows about backbones, views or the runner. Where a paper computes a
quantity over the whole batch (DINO's center, SimCLR's negatives), it is computed over every rank of a
distributed run (``sslbench.base.collectives``); in one process those calls are the identity.
"""

from sslbench.losses.bootstrap import byol_loss
from sslbench.losses.contrastive import nt_xent_loss
from sslbench.losses.distillation import dino_loss, dino_mse_loss, dino_pairs, updated_center

__all__ = ["byol_loss", "dino_loss", "dino_mse_loss", "dino_pairs", "nt_xent_loss", "updated_center"]
