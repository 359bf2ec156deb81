"""Projection and prediction heads shared by the methods.

Every head's last layer runs in fp32 whatever the autocast (``_in_fp32``): its output goes straight to
a loss, often through a sharp softmax (DINO's teacher at T = 0.04, SimCLR's tau = 0.1), where bf16
rounding of the logits would be magnified 10-25x. The layers before it keep the autocast precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from sslbench.base.precision import without_autocast


def _in_fp32(layers: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    with without_autocast(x.device.type):
        return layers(x.float())


class ScaleOnlyBatchNorm(nn.Module):
    """BatchNorm with a learnable scale and no shift: TensorFlow's ``BatchNormalization(center=False)``,
    which SimCLR's reference puts after the projection head's last layer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x) * self.weight


class MLPHead(nn.Module):
    """Linear -> BatchNorm -> ReLU, repeated, then a final Linear without bias (optionally batch-normalised).

    BYOL's projector and predictor (Grill et al. 2020, Sec. 3.3: hidden 4096, output 256, BN; reference
    ``networks.MLP``: a bias on the hidden Linear, none on the output one). SimCLR's projection head g(.)
    (Chen et al. 2020, Sec. 2.1) with ``last_bn``, as its reference ``projection_head``: no Linear has a
    bias (a BatchNorm follows each), and the output's BatchNorm scales but does not shift.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False
    ):
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [
                nn.Linear(dim, hidden_dim, bias=not last_bn),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
            ]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=False))
        if last_bn:
            layers.append(ScaleOnlyBatchNorm(out_dim))
        self.mlp = nn.Sequential(*layers)
        self._last = 2 if last_bn else 1  # the final Linear (and its BatchNorm), run in fp32

    def forward(self, x: Tensor) -> Tensor:
        return _in_fp32(self.mlp[-self._last :], self.mlp[: -self._last](x))


def init_linears(module: nn.Module, std: Callable[[int], float], truncated: bool) -> None:
    """Every Linear under ``module``: weights N(0, std(fan_in)^2), cut at 2 std when ``truncated``, and
    zero biases, for heads whose reference initialises them otherwise than PyTorch does (haiku's default
    is truncated with std 1/sqrt(fan_in); SimCLR's dense layers use N(0, 0.01^2))."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            scale = std(layer.in_features)
            if truncated:
                nn.init.trunc_normal_(layer.weight, std=scale, a=-2 * scale, b=2 * scale)
            else:
                nn.init.normal_(layer.weight, std=scale)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, Sec. 3.1 and Appendix).

    A 3-layer MLP (hidden 2048, GELU) to a 256-d bottleneck, L2 normalisation, then a weight-normalised
    linear layer without bias to ``out_dim``. With ``norm_last_layer`` the weight norm's magnitude is
    fixed at 1, which the paper found stabilises training.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(d_in, d_out), nn.GELU()]
        layers.append(nn.Linear(dims[-1], bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        if norm_last_layer:
            magnitude.requires_grad_(False)

    def forward(self, x: Tensor, predictor: nn.Module | None = None) -> Tensor:
        """``predictor`` (DINO's ablation, student only) acts on the bottleneck before normalisation."""
        x = self.mlp(x)
        if predictor is not None:
            x = predictor(x)
        return _in_fp32(lambda bottleneck: self.last_layer(F.normalize(bottleneck, dim=-1)), x)
