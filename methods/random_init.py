"""Random reference: the untrained backbone, evaluated only.

The "Random" row of the DINO paper's k-NN/linear tables (Caron et al. 2021, arXiv 2104.14294): how much
of a number comes from the architecture and the protocol alone. Same seed, so the same weights every
method starts from.
"""

from __future__ import annotations

from sslbench import Method, register_method


@register_method("random")
class RandomInit(Method):
    paper = "untrained backbone, as in Caron et al. 2021"
    trainable = False
