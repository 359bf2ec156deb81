"""Ablations: each variant changes exactly what it claims, in the plan and in the forward pass, and a tiny
ablation writes its table.

The built-in table is the DINO paper's (Caron et al. 2021, Table 7 and Sec. 5.3): no centering, no
sharpening, no momentum teacher, MSE loss, a predictor, no multi-crop. The forward-pass checks build a
small DINO (ViT-Tiny at 32 px, 64 outputs) and recompute what the variant should do from its own modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sslbench import create_backbone, get_method, list_methods, multicrop_forward
from sslbench.base.schedules import cosine_schedule
from sslbench.config import RunConfig, config_to_dict, resolve_config
from sslbench.losses import dino_loss, dino_mse_loss
from sslbench.method import Method, Step, TrainContext
from sslbench.training.ablation import dino_variants, variants_for
from sslbench.training.experiment import Variant
from sslbench.training.optim import build_optimizer, parameter_groups
from sslbench.training.runner import PairPlan, plan_pair
from sslbench.training.step import optimization_step

CPU = torch.device("cpu")
ARCH = "vit_tiny16"
NAMES = ["full", "no_centering", "no_sharpening", "no_momentum_teacher", "mse_loss", "with_predictor",
         "no_multicrop"]  # fmt: skip
# What each variant claims to change: "section.key" -> value, in the planned train config and options.
CLAIMS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_centering": {"dino.center_momentum": 1.0},
    "no_sharpening": {"dino.teacher_temp": 0.1, "dino.warmup_teacher_temp": 0.1},
    "no_momentum_teacher": {"train.ema_momentum": 0.0, "train.ema_momentum_end": 0.0},
    "mse_loss": {"dino.loss": "mse"},
    "with_predictor": {"dino.predictor": True},
    "no_multicrop": {"dino.local_crops_number": 0, "dino.global_crops_scale": (0.14, 1.0)},
}
LOCAL_CROPS = 2
BATCH = 4
STEP = Step(0, 0, 2, 2)  # the first of 2 iterations of 1 epoch
LABELS = torch.zeros(BATCH, dtype=torch.long)
# A small DINO for the forward-pass checks.
SMALL = RunConfig(
    method_options={
        "dino": {"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "local_crops_number": LOCAL_CROPS}
    }
)


def _variant(name: str, config: RunConfig = SMALL) -> Variant:
    return {v.name: v for v in dino_variants(config)}[name]


def _plan(variant: Variant, base: RunConfig = SMALL, method: str = "dino", arch: str = ARCH) -> PairPlan:
    """The variant's pair plan, resolved exactly as run_benchmark resolves it."""
    config = resolve_config([config_to_dict(base), variant.overrides], list(list_methods()))
    return plan_pair(get_method(method), arch, config, CPU, 32)


def _flat(plan: PairPlan) -> dict[str, Any]:
    train = {f"train.{k}": v for k, v in dataclasses.asdict(plan.train).items()}
    return train | {f"dino.{k}": v for k, v in dataclasses.asdict(plan.method_options).items()}


def _build(plan: PairPlan, seed: int = 0) -> Method:
    torch.manual_seed(seed)
    backbone = create_backbone(ARCH, 32)
    return get_method("dino")(backbone, plan.method_options, TrainContext(1, 2, 10, 32))


def _views(method: Method, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    local = method.view_recipe().num_local_crops
    sizes = [32, 32] + [16] * local
    return [torch.randn(BATCH, 3, size, size, generator=gen) for size in sizes]


def _outputs(method: Method, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Student (every crop) and teacher (global crops) outputs, from the method's own modules."""
    with torch.no_grad():
        student = multicrop_forward(method.backbone, views, method.head)
        teacher = multicrop_forward(method.teacher_backbone, views[:2], method.teacher_head)
    return student, teacher


# --- the plan: exactly the claimed keys differ -----------------------------------------------------------


def test_dino_variants_are_the_papers_table() -> None:
    assert [v.name for v in dino_variants(RunConfig())] == NAMES
    assert variants_for("dino", RunConfig(), []) == dino_variants(RunConfig())


@pytest.mark.parametrize("name", NAMES)
def test_each_variant_changes_exactly_what_it_claims(name: str) -> None:
    base = RunConfig()
    full = _flat(_plan(_variant("full", base), base))
    planned = _flat(_plan(_variant(name, base), base))
    changed = {key: value for key, value in planned.items() if full[key] != value}
    assert changed == CLAIMS[name]
    if name == "no_sharpening":
        assert planned["dino.teacher_temp"] == planned["dino.student_temp"]
        assert planned["dino.warmup_teacher_temp"] == planned["dino.student_temp"]


def test_no_sharpening_follows_the_runs_student_temperature() -> None:
    base = RunConfig(method_options={"dino": {"student_temp": 0.2}})
    planned = _flat(_plan(_variant("no_sharpening", base), base))
    assert planned["dino.student_temp"] == 0.2
    assert planned["dino.teacher_temp"] == planned["dino.warmup_teacher_temp"] == 0.2


def test_variants_keep_the_runs_other_settings() -> None:
    """A variant is an override on the run's config, not a reset to the defaults."""
    base = resolve_config(
        [{"train": {"epochs": 7, "lr": 1e-3}, "dino": {"out_dim": 128, "teacher_temp": 0.07}}],
        list(list_methods()),
    )
    for variant in dino_variants(base):
        plan = _plan(variant, base)
        assert (plan.train.epochs, plan.train.lr, plan.method_options.out_dim) == (7, 1e-3, 128)
        expected_temp = 0.1 if variant.name == "no_sharpening" else 0.07
        assert plan.method_options.teacher_temp == expected_temp


# --- the forward pass ------------------------------------------------------------------------------------


def test_no_centering_keeps_the_center_at_zero_while_full_moves_it() -> None:
    method = _build(_plan(_variant("no_centering")))
    views = _views(method)
    method.training_step(views, LABELS, STEP)
    assert torch.equal(method.center, torch.zeros(1, 64))

    method = _build(_plan(_variant("full")))
    _, teacher = _outputs(method, views)
    method.training_step(views, LABELS, STEP)
    assert not torch.equal(method.center, torch.zeros(1, 64))
    # Eq. 4 from a zero center: C = (1 - 0.9) * mean over both global crops of the teacher's outputs.
    expected = 0.1 * torch.cat(teacher).mean(dim=0, keepdim=True)
    torch.testing.assert_close(method.center, expected)


def _cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor, temp: float) -> torch.Tensor:
    return -(teacher_probs * F.log_softmax(student_logits / temp, dim=-1)).sum(dim=-1).mean()


@pytest.mark.parametrize(
    ("name", "loss_fn", "teacher_temp"),
    [
        ("full", dino_loss, 0.04),
        ("no_sharpening", dino_loss, 0.1),
        ("mse_loss", dino_mse_loss, 0.04),
    ],
)
def test_training_step_loss_matches_an_independent_recomputation(name, loss_fn, teacher_temp) -> None:
    method = _build(_plan(_variant(name)))
    views = _views(method)
    assert len(views) == 2 + LOCAL_CROPS
    student, teacher = _outputs(method, views)
    output = method.training_step(views, LABELS, STEP)
    assert output.logs["teacher_temp"] == pytest.approx(teacher_temp)
    expected = loss_fn(student, teacher, torch.zeros(1, 64), 0.1, teacher_temp)
    torch.testing.assert_close(output.loss.detach(), expected)
    # The other loss (or the other temperature) on the same outputs gives another number.
    other_fn = dino_loss if loss_fn is dino_mse_loss else dino_mse_loss
    assert not torch.allclose(expected, other_fn(student, teacher, torch.zeros(1, 64), 0.1, teacher_temp))
    if name != "mse_loss":
        other_temp = 0.04 if teacher_temp == 0.1 else 0.1
        assert not torch.allclose(expected, dino_loss(student, teacher, torch.zeros(1, 64), 0.1, other_temp))


def test_no_sharpening_uses_the_student_temperature_on_the_teacher() -> None:
    method = _build(_plan(_variant("no_sharpening")))
    views = _views(method)
    student, teacher = _outputs(method, views)
    loss = method.training_step(views, LABELS, STEP).loss.detach()
    # Written out: the teacher's softmax at tau_s = 0.1, each global crop against every other crop.
    probs = [F.softmax(t / 0.1, dim=-1) for t in teacher]
    terms = [_cross_entropy(q, s, 0.1) for i, q in enumerate(probs) for j, s in enumerate(student) if i != j]
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_mse_loss_variant_calls_the_mse_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    module = sys.modules[get_method("dino").__module__]
    calls: list[str] = []

    def spy(name: str):
        real = module.LOSSES[name]

        def wrapped(*args: Any) -> torch.Tensor:
            calls.append(name)
            return real(*args)

        return wrapped

    for name in list(module.LOSSES):
        monkeypatch.setitem(module.LOSSES, name, spy(name))
    for variant, expected in (("mse_loss", "mse"), ("full", "cross_entropy")):
        method = _build(_plan(_variant(variant)))
        method.training_step(_views(method), LABELS, STEP)
        assert calls.pop() == expected


def test_with_predictor_trains_a_student_only_predictor() -> None:
    method = _build(_plan(_variant("with_predictor")))
    assert method.predictor is not None
    assert _build(_plan(_variant("full"))).predictor is None
    teacher_modules = [method.teacher_backbone, method.teacher_head]
    for _, ema in method.momentum_pairs():
        assert ema in teacher_modules
    predictor_ids = {id(p) for p in method.predictor.parameters()}
    optimized = {id(p) for group in parameter_groups([method]) for p in group["params"]}
    assert predictor_ids <= optimized

    output = method.training_step(_views(method), LABELS, STEP)
    output.loss.backward()
    grads = [p.grad for p in method.predictor.parameters()]
    assert all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    for module in teacher_modules:
        for param in module.parameters():
            assert not param.requires_grad and param.grad is None


def test_no_multicrop_uses_the_two_global_crops_only(monkeypatch: pytest.MonkeyPatch) -> None:
    method = _build(_plan(_variant("no_multicrop")))
    assert method.view_recipe().num_local_crops == 0
    assert _build(_plan(_variant("full"))).view_recipe().num_local_crops == LOCAL_CROPS
    views = _views(method)
    assert [v.shape[-1] for v in views] == [32, 32]

    module = sys.modules[get_method("dino").__module__]
    seen: list[tuple[int, int]] = []

    def spy(student_out, teacher_out, *rest):
        seen.append((len(student_out), len(teacher_out)))
        return dino_loss(student_out, teacher_out, *rest)

    monkeypatch.setitem(module.LOSSES, "cross_entropy", spy)
    student, teacher = _outputs(method, views)
    loss = method.training_step(views, LABELS, STEP).loss.detach()
    assert seen == [(2, 2)]
    # Two pairs: teacher(x1) against student(x2) and teacher(x2) against student(x1).
    q1, q2 = (F.softmax(t / 0.04, dim=-1) for t in teacher)
    expected = (_cross_entropy(q1, student[1], 0.1) + _cross_entropy(q2, student[0], 0.1)) / 2
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("name", ["no_momentum_teacher", "full"])
def test_momentum_zero_copies_the_student_into_the_teacher(name: str) -> None:
    plan = _plan(_variant(name))
    train = plan.train
    momentum = float(cosine_schedule(train.ema_momentum, train.ema_momentum_end, 1, 2)[0])
    assert momentum == (0.0 if name == "no_momentum_teacher" else train.ema_momentum)
    method = _build(plan)
    optimizer = build_optimizer(train.optimizer, parameter_groups([method]), train.momentum)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    before = [p.detach().clone() for p in method.backbone.parameters()]
    optimization_step(
        method, optimizer, _views(method), LABELS, STEP, train.clip_grad, momentum, contextlib.nullcontext()
    )
    after = [p.detach() for p in method.backbone.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)), "the student did not move"
    for online, ema in method.momentum_pairs():
        pairs = list(zip(online.parameters(), ema.parameters(), strict=True))
        if name == "no_momentum_teacher":
            assert all(torch.equal(s, t) for s, t in pairs)
        else:
            assert not all(torch.equal(s, t) for s, t in pairs)
    if name == "full":  # theta_t = m theta_t + (1 - m) theta_s, from a teacher equal to the old student
        for old, new, teacher in zip(before, after, method.teacher_backbone.parameters(), strict=True):
            torch.testing.assert_close(teacher, momentum * old + (1 - momentum) * new)
