"""The heads' small details, each as the reference code has it.

BYOL (deepmind-research ``byol/utils/networks.py``, ``MLP``): hk.Linear(hidden, with_bias=True), BatchNorm
(scale and offset), ReLU, hk.Linear(output, with_bias=False); haiku's default weight init is a normal
truncated at 2 std with std 1/sqrt(fan_in). SimCLR (google-research ``model_util.projection_head`` and
``linear_layer``): dense layers without bias when a BN follows (always, in the head), the middle BN with
a shift, the last one with ``center=False``, dense weights N(0, 0.01^2).
"""

from __future__ import annotations

import torch
from torch import nn

from sslbench import TrainContext, create_backbone
from sslbench.method.registry import get_method
from sslbench.models.heads import MLPHead, ScaleOnlyBatchNorm, init_linears
from sslbench.training.optim import parameter_groups


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _build(name: str, **options):
    torch.manual_seed(0)
    method_cls = get_method(name)
    backbone = create_backbone("resnet18", 32)
    return method_cls(backbone, method_cls.Config(**options), TrainContext(2, 1, 10, 32))


def test_byol_heads_are_the_reference_mlp():
    byol = _build("byol", proj_hidden_dim=512, pred_hidden_dim=512)
    for head in (byol.projector, byol.predictor, byol.target_projector):
        hidden, output = _linears(head)
        assert hidden.bias is not None and output.bias is None
        batch_norms = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
        assert len(batch_norms) == 1 and batch_norms[0].affine  # scale and offset
    hidden, output = _linears(byol.projector)
    for layer in (hidden, output):  # truncated normal, std 1/sqrt(fan_in): 0.88/sqrt(fan_in) after the cut
        fan_in = layer.in_features
        assert layer.weight.abs().max() <= 2 * fan_in**-0.5
        assert 0.83 < layer.weight.std().item() * fan_in**0.5 < 0.93
    assert torch.count_nonzero(hidden.bias) == 0


def test_simclr_head_is_the_reference_projection_head():
    simclr = _build("simclr")
    linears = _linears(simclr.projector)
    assert len(linears) == 2 and all(layer.bias is None for layer in linears)
    middle = [m for m in simclr.projector.modules() if type(m) is nn.BatchNorm1d and m.affine]
    assert len(middle) == 1  # the middle BN scales and shifts
    last = simclr.projector.mlp[-1]
    assert isinstance(last, ScaleOnlyBatchNorm) and not last.norm.affine
    assert {name for name, _ in last.named_parameters()} == {"weight"}  # scale, no shift
    for layer in linears:
        assert 0.0095 < layer.weight.std().item() < 0.0105


def test_scale_only_batch_norm_normalises_then_scales_without_decay():
    norm = ScaleOnlyBatchNorm(4)
    norm.weight.data = torch.tensor([1.0, 2.0, 3.0, 4.0])
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 5 + 3
    out = norm(x)
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=0, unbiased=False), norm.weight.detach(), atol=1e-3, rtol=0)
    # Its scale is a norm parameter: no weight decay, excluded from LARS's adaptation, as the reference's
    groups = parameter_groups(nn.Sequential(nn.Linear(4, 4, bias=False), norm))
    unregularised = next(group for group in groups if not group["regularized"])
    assert any(param is norm.weight for param in unregularised["params"])


def test_the_last_layer_of_every_mlp_head_has_no_bias():
    for last_bn in (False, True):
        head = MLPHead(8, 16, 4, num_layers=3, last_bn=last_bn)
        assert _linears(head)[-1].bias is None
        assert all((layer.bias is None) == last_bn for layer in _linears(head)[:-1])


def test_init_linears_draws_the_asked_distribution():
    layer = nn.Linear(400, 300)
    init_linears(layer, std=lambda fan_in: 1 / fan_in, truncated=False)
    assert abs(layer.weight.std().item() * 400 - 1) < 0.02
    assert torch.count_nonzero(layer.bias) == 0
