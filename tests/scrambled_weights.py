"""Backbones whose every weight matters: what the weight loaders' and exporters' tests round-trip."""

from __future__ import annotations

import torch

from sslbench.models.backbones import Backbone


def scrambled(backbone: Backbone, seed: int) -> Backbone:
    """Every float weight and buffer (BatchNorm statistics too) scaled and shifted by its own random pair,
    so a key lost or misplaced on the way changes the features; in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in backbone.state_dict().values():
            if value.is_floating_point():
                scale, shift = torch.rand(2, generator=generator)
                value.mul_(0.5 + scale).add_(0.2 * shift - 0.1)
    return backbone.eval()
