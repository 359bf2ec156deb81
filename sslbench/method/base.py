"""The Method base class: what a method owns, and the small types it exchanges with the runner.

A method owns its heads, its loss and its teacher. The runner owns everything shared (optimizer,
schedules, precision, clipping, EMA updates, logging, evaluation), which is how every method in a run
gets an identical schedule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from sslbench.data.augment import ViewRecipe
from sslbench.method.recipes import PaperRecipe
from sslbench.models.backbones import Backbone


@dataclass(frozen=True)
class Step:
    """Where training is: a method reads its own schedules (e.g. DINO's teacher temperature) from it."""

    iteration: int
    epoch: int
    iterations_per_epoch: int
    total_iterations: int
    # True on the iterations the runner logs: only then are diagnostics worth their compute.
    diagnose: bool = False

    @property
    def progress(self) -> float:
        return self.iteration / max(self.total_iterations, 1)


@dataclass(frozen=True)
class TrainContext:
    """What a method may know about the run when it is built."""

    epochs: int
    iterations_per_epoch: int
    num_classes: int
    image_size: int

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch


@dataclass
class StepOutput:
    """The loss to minimise, the numbers worth logging (tensors are read only when logged), and the
    embeddings whose spread the collapse diagnostics watch (the projections the loss compares)."""

    loss: Tensor
    logs: dict[str, Tensor | float] = field(default_factory=dict)
    embeddings: Tensor | None = None


@dataclass
class NoOptions:
    """Config of a method without hyper-parameters of its own."""


@dataclass(frozen=True)
class ParameterRule:
    """How the runner treats the parameters of ``module`` (a method never builds its own optimizer).

    ``frozen_epochs``: no update during the first epochs, the gradients dropped after clipping (DINO's
    last layer in epoch 1, SwAV's prototypes); ``weight_decay=False``: no weight decay and, under LARS,
    no adaptation, as the references do for biases and norms. A parameter that never trains is simply
    ``requires_grad=False`` (MoCo v3's frozen patch projection).
    """

    module: nn.Module
    frozen_epochs: float = 0.0
    weight_decay: bool = True

    def frozen_at(self, step: Step) -> bool:
        return step.iteration < round(self.frozen_epochs * step.iterations_per_epoch)


class Method(nn.Module):
    """Base class of every method; subclass it and decorate with ``@register_method("name")``.

    Override ``view_recipe`` and ``training_step``; optionally ``momentum_pairs`` (declared EMA
    teachers, updated by the runner), ``eval_backbone`` (the network the evaluators read),
    ``parameter_rules`` (parameters frozen for a while, or without weight decay) and ``after_backward``.
    State that is not a parameter (a queue of keys, its position) is a registered buffer: checkpoints
    save and restore it with the weights.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Config: ClassVar[type] = NoOptions
    trainable: ClassVar[bool] = True
    # The backbone families ("resnet", "vit") the method trains; another gets one clear line, not a run.
    families: ClassVar[tuple[str, ...]] = ("resnet", "vit")
    # Trains on labels (the supervised row): it skips a dataset's unlabelled pretraining split (STL-10's).
    needs_labels: ClassVar[bool] = False

    @classmethod
    def paper_recipe(cls, family: str, image_size: int, epochs: int) -> PaperRecipe | None:
        """The published recipe ``--recipe paper`` gives this method on a ``family`` backbone ("resnet",
        "vit") at ``image_size`` px for a run of ``epochs``; None: the run's shared schedule."""
        return None

    def __init__(self, backbone: Backbone, config: Any, context: TrainContext) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.context = context

    def view_recipe(self) -> ViewRecipe:
        raise NotImplementedError

    def training_step(self, views: list[Tensor], labels: Tensor, step: Step) -> StepOutput:
        raise NotImplementedError

    def forward(self, views: list[Tensor], labels: Tensor, step: Step) -> StepOutput:
        """Calling the method is its training step, so DistributedDataParallel can wrap it."""
        return self.training_step(views, labels, step)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return []

    def eval_backbone(self) -> Backbone:
        return self.backbone

    def momentum_backbone(self) -> Backbone | None:
        """The EMA copy of the backbone, read from the declared momentum pairs (None without one)."""
        for online, ema in self.momentum_pairs():
            if online is self.backbone:
                return ema
        return None

    def parameter_rules(self) -> list[ParameterRule]:
        """Rules the runner applies to some of the method's parameters; none by default."""
        return []

    def after_backward(self, step: Step) -> None:
        """Hook between backward (and clipping) and the optimizer step."""

    @property
    def feature_source(self) -> str:
        return "teacher backbone" if self.eval_backbone() is not self.backbone else "backbone"

    def resolved_options(self) -> dict[str, Any]:
        """The method's hyper-parameters as used, recorded beside every number."""
        if dataclasses.is_dataclass(self.config):
            return dataclasses.asdict(self.config)
        return {}
