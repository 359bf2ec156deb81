"""The DINO paper's linear evaluation: linear heads trained on augmented views of a frozen backbone.

Reference: facebookresearch/dino ``eval_linear.py`` (``eval_linear``, ``train``, ``validate_network``,
``LinearClassifier``) and the DINO paper (Caron et al. 2021), Appendix, linear evaluation: SGD, batch
1024, 100 epochs, no weight decay, "for each model, we sweep the learning rate value", random resized
crops and horizontal flips in training, central-crop accuracy. The features are
``Backbone.forward_eval``'s "linear" ones: for a ViT the class tokens of the last 4 blocks after the final
norm (``--n_last_blocks 4 --avgpool_patchtokens false``, the ViT-S setting), for a ResNet the global
average pool (the reference's torchvision branch, ``fc = Identity``: no BatchNorm or other layer on top).

The sweep trains one head per lr on the same forward pass, as facebookresearch/dinov2
``dinov2/eval/linear.py`` (``setup_linear_classifiers``: one SGD param group per head; ``eval_linear``:
the heads' cross-entropies summed, so each head gets exactly its own gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode

from sslbench.base.errors import SSLBenchError, unknown_name_message
from sslbench.base.precision import autocast_for, without_autocast
from sslbench.data.datasets import ImageSource, SubsetSource, TransformDataset, make_loader
from sslbench.data.sampling import EpochSampler, SeededViews
from sslbench.evaluation.linear_probe import holdout_split
from sslbench.models.backbones import Backbone

# dinov2/eval/linear.py get_args_parser: learning_rates default, per 256 images. DINO publishes no sweep
# (facebookresearch/dino issue #249); its eval_linear.py default, 0.001, is inside this grid.
DINOV2_LR_GRID: tuple[float, ...] = (
    1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,
)  # fmt: skip
PAPER_PRECISIONS = ("fp32", "bf16")
_LR_REFERENCE_BATCH = 256  # eval_linear.py: args.lr * batch_size_per_gpu * world_size / 256 (linear scaling)
_MOMENTUM = 0.9  # eval_linear.py: SGD(momentum=0.9, weight_decay=0)
_HEAD_INIT_STD = 0.01  # eval_linear.py LinearClassifier: weight N(0, 0.01), bias 0
_TEST_RESIZE_RATIO = 256 / 224  # eval_linear.py val_transform: Resize(256) then CenterCrop(224)


@dataclass
class PaperLinearResult:
    """Outcome of :func:`paper_linear_evaluation`; ``val_top1`` shows how flat the sweep was."""

    top1: float  # test top-1 % of the head whose lr was best on the held-out part of train
    best_lr: float  # as given in ``lrs`` (per 256 images, before the batch scaling)
    val_top1: dict[float, float]  # held-out top-1 % per lr; empty when nothing was held out
    test_predictions: Tensor  # (N_test,) CPU int64, in the test source's order
    epochs: int
    description: str  # one line for the protocol record


def paper_train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """eval_linear.py ``train_transform`` at ``image_size``: RandomResizedCrop (torchvision defaults:
    scale (0.08, 1), ratio (3/4, 4/3), bilinear) and a horizontal flip; no colour augmentation."""
    return T.Compose(
        [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    )


def paper_test_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """eval_linear.py ``val_transform`` at ``image_size``: bicubic Resize of the short side to
    ``image_size * 256/224`` then CenterCrop(image_size), at every size (32 px: Resize(37))."""
    resize = T.Resize(round(image_size * _TEST_RESIZE_RATIO), interpolation=InterpolationMode.BICUBIC)
    return T.Compose([resize, T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


def _check_arguments(
    lrs: Sequence[float], epochs: int, batch_size: int, val_fraction: float, precision: str
) -> None:
    if not lrs or min(lrs) <= 0:
        raise SSLBenchError(f"the paper linear evaluation needs at least one lr > 0; got {list(lrs)}")
    if epochs < 1 or batch_size < 1 or not 0.0 <= val_fraction < 1.0:
        raise SSLBenchError(
            "the paper linear evaluation needs epochs >= 1, batch_size >= 1 and 0 <= val_fraction < 1; "
            f"got {epochs}, {batch_size}, {val_fraction}"
        )
    if precision not in PAPER_PRECISIONS:
        raise SSLBenchError(unknown_name_message("precision", precision, PAPER_PRECISIONS))


def _check_labels(source: ImageSource, num_classes: int, name: str) -> None:
    """An out-of-range label would otherwise fail deep inside the cross-entropy, or not at all."""
    labels = torch.as_tensor(source.labels)
    if labels.numel() == 0:
        raise SSLBenchError(f"the paper linear evaluation got an empty {name} split")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise SSLBenchError(
            f"{name} labels must lie in [0, {num_classes}); got {int(labels.min())}..{int(labels.max())}"
        )


def _split_train(
    train: ImageSource, sweep: list[float], val_fraction: float, seed: int
) -> tuple[ImageSource, ImageSource | None]:
    """(part the heads train on, held-out part the lr is chosen on), split as ``linear_probe`` splits.

    A single lr has nothing to choose between: its head trains on all of train, as the reference's.
    """
    if len(sweep) == 1:
        return train, None
    labels = torch.as_tensor(train.labels).long()
    fit_idx, val_idx = holdout_split(labels, val_fraction, torch.Generator().manual_seed(seed))
    if val_fraction == 0.0 or val_idx.numel() == 0:
        raise SSLBenchError(
            f"val_fraction={val_fraction} with {labels.numel()} training images leaves nothing held out to "
            "choose an lr; raise val_fraction or pass a single lr"
        )
    return SubsetSource(train, fit_idx.numpy()), SubsetSource(train, val_idx.numpy())


def _make_heads(dim: int, num_classes: int, count: int, seed: int, device: torch.device) -> nn.ModuleList:
    """``count`` fp32 Linear(dim, classes) heads with one seeded N(0, 0.01) init, so the lr is all that
    differs between them (the global random state is left alone)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes, dim, generator=generator) * _HEAD_INIT_STD
    heads = nn.ModuleList()
    for _ in range(count):
        head = nn.utils.skip_init(nn.Linear, dim, num_classes, device=device, dtype=torch.float32)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.zero_()
        heads.append(head)
    return heads


def _linear_features(backbone: Backbone, images: Tensor, device: torch.device, precision: str) -> Tensor:
    """The frozen backbone's linear-protocol features: no graph (eval_linear.py ``torch.no_grad``), the
    forward under ``precision``'s autocast, handed to the heads as fp32 (as dinov2's ``.float()``)."""
    with torch.no_grad(), autocast_for(precision, device):
        features = backbone.forward_eval(images.to(device, non_blocking=True))["linear"]
    return features.float().reshape(features.shape[0], -1)


def _train_heads(
    backbone: Backbone,
    heads: nn.ModuleList,
    loader: DataLoader,
    scaled_lrs: list[float],
    epochs: int,
    precision: str,
) -> None:
    """SGD with one param group per head and CosineAnnealingLR(T_max=epochs, eta_min=0) stepped once per
    epoch (eval_linear.py); every batch goes through the backbone once and feeds every head."""
    device = next(heads.parameters()).device
    groups = [{"params": head.parameters(), "lr": lr} for head, lr in zip(heads, scaled_lrs, strict=True)]
    optimizer = torch.optim.SGD(groups, lr=scaled_lrs[0], momentum=_MOMENTUM, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.0)
    sampler = loader.sampler
    for epoch in range(epochs):
        if isinstance(sampler, EpochSampler):
            sampler.set_epoch(epoch)
        for images, labels in loader:
            features = _linear_features(backbone, images, device, precision)
            labels = labels.to(device, non_blocking=True)
            with without_autocast(device.type):
                loss = sum(F.cross_entropy(head(features), labels) for head in heads)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()


@torch.no_grad()
def _predict(
    backbone: Backbone, heads: nn.ModuleList, loader: DataLoader, precision: str
) -> tuple[Tensor, Tensor]:
    """((heads, N) predicted classes, (N,) labels) on the CPU, one backbone pass for all heads."""
    device = next(heads.parameters()).device
    predictions, all_labels = [], []
    for images, labels in loader:
        features = _linear_features(backbone, images, device, precision)
        with without_autocast(device.type):
            predictions.append(torch.stack([head(features).argmax(dim=1) for head in heads]).cpu())
        all_labels.append(torch.as_tensor(labels).long().reshape(-1))
    return torch.cat(predictions, dim=1).long(), torch.cat(all_labels)


def _describe(
    backbone: Backbone,
    image_size: int,
    epochs: int,
    batch_size: int,
    val_top1: dict[float, float],
    best_lr: float,
    val_fraction: float,
) -> str:
    """The protocol line; it flags a best lr at an end of the sweep (the optimum may lie beyond it)."""
    resize = round(image_size * _TEST_RESIZE_RATIO)
    choice = f"lr {best_lr:g} on all of train"
    if val_top1:
        sweep = sorted(val_top1)
        edge = ""
        if best_lr == sweep[-1]:  # ties go to the smaller lr, so the top lr won outright
            edge = "; best lr at the high end of the sweep"
        elif best_lr == sweep[0] and val_top1[sweep[0]] > val_top1[sweep[1]]:
            edge = "; best lr at the low end of the sweep"
        choice = (
            f"best lr {best_lr:g} of {len(sweep)} ({sweep[0]:g}..{sweep[-1]:g}) trained at once on one "
            f"forward, chosen on a seeded stratified {val_fraction:.0%} of train held out (heads trained on "
            f"the rest, not retrained){edge}"
        )
    return (
        f"DINO linear eval: frozen {backbone.arch} ({backbone.linear_features_description}), "
        f"RandomResizedCrop({image_size}, scale 0.08-1) + flip, test Resize({resize}, bicubic) + "
        f"CenterCrop({image_size}); {epochs} epochs, batch {batch_size}, SGD momentum 0.9, wd 0, "
        f"lr x {batch_size}/256, per-epoch cosine to 0; {choice}"
    )


def _train_loader(
    fit: ImageSource, transform: T.Compose, batch_size: int, seed: int, num_workers: int, device: torch.device
) -> DataLoader:
    """Augmented views seeded per (seed, epoch, image) and a seeded order per epoch, as training's
    (``sslbench.data.sampling``), so a run repeats whatever ``num_workers``; the last batch is kept
    (eval_linear.py's loader does not drop it)."""
    return DataLoader(
        SeededViews(fit, transform, seed),
        batch_size=batch_size,
        sampler=EpochSampler(len(fit), seed, batch_per_rank=1),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


def paper_linear_evaluation(
    backbone: Backbone,
    train: ImageSource,
    test: ImageSource,
    num_classes: int,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    epochs: int = 100,
    lrs: Sequence[float] = DINOV2_LR_GRID,
    batch_size: int = 1024,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
) -> PaperLinearResult:
    """DINO's linear evaluation of a frozen ``backbone`` (eval mode, no gradient), with an lr sweep.

    ``lrs`` are per 256 images and scaled by ``batch_size / 256`` as eval_linear.py does. One head per lr
    is trained concurrently on a seeded, stratified ``1 - val_fraction`` part of ``train``; the lr whose
    head is most accurate on the held-out rest (ties: the smaller lr) is reported with that head's test
    accuracy, without retraining on all of train. The reference instead reports its best epoch on the
    ImageNet val set (``best_acc``) with an lr swept against that same set, which a benchmark must not do.
    A single lr trains on all of train. Deterministic for a seed. ``precision`` (fp32 | bf16) is the
    backbone's autocast; the heads stay fp32. The backbone's train/eval mode is restored afterwards.
    """
    _check_arguments(lrs, epochs, batch_size, val_fraction, precision)
    _check_labels(train, num_classes, "train")
    _check_labels(test, num_classes, "test")
    device = torch.device(device)
    sweep = sorted({float(lr) for lr in lrs})
    fit, held_out = _split_train(train, sweep, val_fraction, seed)
    train_loader = _train_loader(
        fit, paper_train_transform(image_size, mean, std), batch_size, seed, num_workers, device
    )
    test_transform = paper_test_transform(image_size, mean, std)

    def eval_loader(source: ImageSource) -> DataLoader:
        dataset = TransformDataset(source, test_transform)
        return make_loader(dataset, batch_size, False, seed, num_workers, device, False)

    heads = _make_heads(backbone.linear_dim, num_classes, len(sweep), seed, device)
    scaled_lrs = [lr * batch_size / _LR_REFERENCE_BATCH for lr in sweep]
    was_training = backbone.training
    backbone.eval()
    try:
        _train_heads(backbone, heads, train_loader, scaled_lrs, epochs, precision)
        val_top1: dict[float, float] = {}
        if held_out is not None:
            val_predictions, val_labels = _predict(backbone, heads, eval_loader(held_out), precision)
            correct = (val_predictions == val_labels).double().mean(dim=1) * 100.0
            val_top1 = {lr: float(correct[i]) for i, lr in enumerate(sweep)}
        best = max(range(len(sweep)), key=lambda i: (val_top1.get(sweep[i], 0.0), -sweep[i]))
        test_predictions, test_labels = _predict(
            backbone, heads[best : best + 1], eval_loader(test), precision
        )
    finally:
        backbone.train(was_training)
    predictions = test_predictions[0]
    return PaperLinearResult(
        top1=100.0 * float((predictions == test_labels).double().mean()),
        best_lr=sweep[best],
        val_top1=val_top1,
        test_predictions=predictions,
        epochs=epochs,
        description=_describe(backbone, image_size, epochs, batch_size, val_top1, sweep[best], val_fraction),
    )
