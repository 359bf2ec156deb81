"""Projection and prediction heads shared by the methods.

Every head's last layer runs in fp32 whatever the autocast (``_in_fp32``): its output goes straight to
a loss, often through a sharp softmax (DINO's teacher at T = 0.04, SimCLR's tau = 0.1), where bf16
rounding of the logits would be magnified 10-25x. The layers before it keep the autocast precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from sslbench.base.precision import without_autocast


def _in_fp32(layers: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    with without_autocast(x.device.type):
        return layers(x.float())


class MLPHead(nn.Module):
    """Linear -> BatchNorm -> ReLU, repeated, then a final Linear (optionally batch-normalised).

    BYOL's projector and predictor (Grill et al. 2020, Sec. 3.3: hidden 4096, output 256, BN) and
    SimCLR's projection head g(.) (Chen et al. 2020, Sec. 2.1; the reference code also normalises the
    output with BN and drops that layer's bias: ``last_bn``).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False
    ):
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim))
        self.mlp = nn.Sequential(*layers)
        self._last = 2 if last_bn else 1  # the final Linear (and its BatchNorm), run in fp32

    def forward(self, x: Tensor) -> Tensor:
        return _in_fp32(self.mlp[-self._last :], self.mlp[: -self._last](x))


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
