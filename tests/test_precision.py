"""``precision: auto``: bf16 autocast where the device multiplies bf16 natively, fp32 elsewhere; and a
bf16 step of every registered method agrees closely with its fp32 step on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from test_methods import TRAINABLE_PAIRS, build, labels_for, make_views

from sslbench.base import precision as P
from sslbench.base.precision import autocast_for, cpu_bf16_units, precision_choice
from sslbench.config import TrainConfig, resolve_config
from sslbench.evaluation.features import feature_precision
from sslbench.method import Step
from sslbench.models.backbones import set_fused_attention
from sslbench.training.optim import build_optimizer, parameter_groups
from sslbench.training.step import fused_attention_for, optimization_step, precision_for

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
IMAGES = 16  # per step: at 4, BatchNorm over so few samples makes the comparison needlessly noisy


def _cpu_with(monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "units"), [(True, True, "AMX"), (False, True, "AVX512-BF16"), (False, False, None)]
)
def test_cpu_bf16_units_reads_torchs_probes(monkeypatch, amx, avx512_bf16, units) -> None:
    _cpu_with(monkeypatch, amx, avx512_bf16)
    assert cpu_bf16_units() == units


def test_a_torch_without_the_probes_reads_as_no_units(monkeypatch) -> None:
    for _, probe in P._CPU_BF16_PROBES:
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    assert cpu_bf16_units() is None


def test_auto_is_bf16_where_native_and_fp32_elsewhere(monkeypatch) -> None:
    _cpu_with(monkeypatch, False, True)
    assert precision_choice("auto", CPU) == ("bf16", "auto: the CPU has AVX512-BF16")
    assert precision_choice("auto", CUDA) == ("bf16", "auto: CUDA")
    assert precision_choice("fp32", CPU) == ("fp32", "set in the config")
    assert precision_for(TrainConfig(precision="bf16"), CPU) == "bf16"
    _cpu_with(monkeypatch, False, False)
    assert precision_choice("auto", CPU) == ("fp32", "auto: no native bf16 matrix units on this cpu")
    assert precision_choice("auto", torch.device("mps"))[0] == "fp32"
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        precision_choice("fp16", CPU)


def test_feature_precision_follows_training_unless_set(monkeypatch) -> None:
    _cpu_with(monkeypatch, False, True)
    follows = resolve_config([{"train": {"precision": "fp32"}}], ["dino"])
    assert feature_precision(follows, CPU)[0] == "fp32"
    assert feature_precision(resolve_config([{}], ["dino"]), CPU)[0] == "bf16"
    own = resolve_config([{"eval": {"precision": "fp32"}}], ["dino"])
    assert feature_precision(own, CPU)[0] == "fp32"
    assert feature_precision(resolve_config([{}], ["dino"]), CUDA)[0] == "fp32"  # as the references


def test_autocast_for_runs_matmuls_in_the_precision() -> None:
    a = torch.randn(4, 4)
    with autocast_for("bf16", CPU):
        assert (a @ a).dtype == torch.bfloat16
    with autocast_for("fp32", CPU):
        assert (a @ a).dtype == torch.float32


def test_attention_kernel_is_plain_on_a_cpu_under_bf16_only() -> None:
    assert fused_attention_for(CPU, "bf16") is False
    assert fused_attention_for(CPU, "fp32") is True and fused_attention_for(CUDA, "bf16") is True


def _step(method, views, precision: str) -> tuple[float, torch.Tensor]:
    """One SGD step of ``method`` in ``precision``: the loss and the flattened parameter change."""
    optimizer = build_optimizer("sgd", parameter_groups([method]), 0.0)
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = 1.0, 0.0
    before = torch.cat([p.detach().flatten().clone() for p in method.parameters()])
    step = Step(iteration=1, epoch=1, iterations_per_epoch=1, total_iterations=2)  # past any freezing
    set_fused_attention(method, fused_attention_for(CPU, precision))
    loss, _ = optimization_step(
        method, optimizer, views, labels_for(IMAGES), step, 0.0, 0.996, autocast_for(precision, CPU)
    )
    after = torch.cat([p.detach().flatten() for p in method.parameters()])
    return float(loss), after - before


@pytest.mark.parametrize(("name", "arch"), TRAINABLE_PAIRS)
def test_bf16_and_fp32_steps_agree(name: str, arch: str) -> None:
    """The same step from the same weights on 16 images: losses within 1%, updates of about the same
    length pointing the same way (BYOL, whose first gradients are the smallest, differs most: cosine
    0.97, length 9% on a ViT), and a bf16 step repeats exactly."""
    torch.manual_seed(0)
    method = build(name, arch)
    method.train()
    views = make_views(method.view_recipe(), n=IMAGES)
    twin, triplet = copy.deepcopy(method), copy.deepcopy(method)
    torch.manual_seed(1)
    loss32, update32 = _step(method, views, "fp32")
    torch.manual_seed(1)
    loss16, update16 = _step(twin, views, "bf16")
    torch.manual_seed(1)
    again, update_again = _step(triplet, views, "bf16")
    assert again == loss16 and torch.equal(update_again, update16)  # bf16 repeats exactly
    assert abs(loss16 - loss32) <= 0.01 * abs(loss32)
    assert torch.nn.functional.cosine_similarity(update16, update32, dim=0) > 0.95
    assert update16.norm() == pytest.approx(update32.norm(), rel=0.15)


@pytest.mark.parametrize(("precision", "fused"), [("bf16", False), ("fp32", True)])
def test_the_runner_picks_the_attention_kernel_and_hash_of_the_precision(precision: str, fused: bool) -> None:
    """bf16 on a CPU: plain attention; fp32: timm's fused default. The pair hash holds the precision."""
    from sslbench.data.datasets import load_dataset
    from sslbench.method.registry import get_method
    from sslbench.models.backbones import create_backbone
    from sslbench.training.runner import build_method, pair_config_hash, plan_pair

    config = resolve_config([{"train": {"precision": precision}, "dino": {"out_dim": 64}}], ["dino"])
    plan = plan_pair(get_method("dino"), "vit_tiny16", config, CPU, 32)
    data = load_dataset("embedded")
    method = build_method(plan, create_backbone("vit_tiny16", 32), data, 4)
    kernels = {m.fused_attn for m in method.modules() if hasattr(m, "fused_attn")}
    assert kernels == {fused}
    other = resolve_config([{"train": {"precision": "fp32" if precision == "bf16" else "bf16"}}], ["dino"])
    other_plan = plan_pair(get_method("dino"), "vit_tiny16", other, CPU, 32)
    assert pair_config_hash(plan, config, data, method) != pair_config_hash(other_plan, other, data, method)


def test_heads_last_layers_run_in_fp32_under_bf16() -> None:
    """DINO's weight-normalised last layer (teacher logits at T = 0.04) and the MLP heads' final Linear
    and BatchNorm give fp32 outputs equal to an fp32 pass over their (bf16) inputs."""
    from sslbench.models.heads import DINOHead, MLPHead

    torch.manual_seed(0)
    x = torch.randn(6, 32)
    dino, mlp = DINOHead(32, 64, hidden_dim=16, bottleneck_dim=8), MLPHead(32, 16, 8, last_bn=True).eval()
    with autocast_for("bf16", CPU):
        logits, bottleneck = dino(x), dino.mlp(x)
        projected, hidden = mlp(x), mlp.mlp[:-2](x)
    assert bottleneck.dtype == hidden.dtype == torch.bfloat16  # the layers before keep the autocast
    assert logits.dtype == projected.dtype == torch.float32
    expected = dino.last_layer(torch.nn.functional.normalize(bottleneck.float(), dim=-1))
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(projected, mlp.mlp[-2:](hidden.float()), rtol=1e-6, atol=1e-6)
