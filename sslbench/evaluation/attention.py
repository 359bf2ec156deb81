"""Class-token attention maps of trained ViTs: where each head of the last block looks.

DINO's ``visualize_attention.py`` shows the last block's class-token attention per head and keeps the
patches that hold a fixed share of its mass; self-supervised ViTs are known for heads that segment the
object. This module draws those maps for every ViT pair of a run and, given object masks, scores them
against the object with the Jaccard index, so the claim can be checked rather than eyeballed.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from sslbench.base.atomic_io import atomic_path, make_folder, write_json_atomic
from sslbench.base.errors import SSLBenchError
from sslbench.data.augment import build_eval_transform
from sslbench.data.datasets import load_dataset, read_rgb
from sslbench.models.backbones import ARCHS, Backbone, create_backbone

_MASS_TOLERANCE = 1e-6  # float sums of a float32 map are not exact; a share this close counts as reached


class _Captured(Exception):
    """Stops the forward pass once the last block's input is known: the rest is not needed."""


def cls_attention_tokens(backbone: Backbone, images: Tensor) -> Tensor:
    """Last block's class-token attention over all tokens, prefix first: (N, heads, tokens); rows sum to 1.

    Recomputed as the block does (norm1 -> qkv -> q_norm/k_norm -> softmax(q k^T * scale)) because the fused
    kernel never materialises the weights. Runs in eval mode without gradients (the mode is restored).
    """
    if backbone.family != "vit":
        raise SSLBenchError(f"{backbone.arch} has no attention to show: attention maps need a ViT arch")
    model = backbone.model
    block = model.blocks[-1]
    attn = block.attn
    captured: list[Tensor] = []

    def capture(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0])
        raise _Captured

    was_training = backbone.training
    handle = block.register_forward_pre_hook(capture)
    backbone.eval()
    try:
        with torch.no_grad():
            with contextlib.suppress(_Captured):
                model.forward_features(images)
            x = block.norm1(captured[0])
            batch, tokens, _ = x.shape
            head_dim = attn.qkv.out_features // (3 * attn.num_heads)
            qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            scores = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # only the class-token query
            return scores.softmax(dim=-1)[:, :, 0]
    finally:
        handle.remove()
        backbone.train(was_training)


def cls_attention(backbone: Backbone, images: Tensor) -> Tensor:
    """Class-token attention per head over the patch grid, prefix tokens (cls, registers) left out:
    (N, heads, grid_h, grid_w). The patch part sums to one minus the prefix tokens' share."""
    row = cls_attention_tokens(backbone, images)
    patches = row[..., backbone.model.num_prefix_tokens :]
    patch_h, patch_w = backbone.model.patch_embed.patch_size
    grid_h, grid_w = math.ceil(images.shape[-2] / patch_h), math.ceil(images.shape[-1] / patch_w)
    if grid_h * grid_w != patches.shape[-1]:
        raise SSLBenchError(f"{patches.shape[-1]} patch tokens do not form a {grid_h}x{grid_w} grid")
    return patches.reshape(*patches.shape[:2], grid_h, grid_w)


def mass_mask(attention: Tensor, mass: float = 0.6) -> Tensor:
    """Smallest set of patches holding ``mass`` of each map's attention, as DINO's visualize_attention.py.

    Each (N, head) map is normalised to sum 1 and sorted in descending order; a patch is kept when the
    patches ranked above it hold less than ``mass`` (so the kept set is the shortest prefix reaching
    ``mass``), the top patch is always kept, and patches tied with the last kept one are kept too so the
    result does not depend on sort order. Returns a boolean mask of the input's shape.
    """
    if not 0.0 < mass <= 1.0:
        raise SSLBenchError(f"attention mass must be in (0, 1], got {mass}")
    flat = attention.detach().flatten(-2).double()
    share = flat / flat.sum(-1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    ranked, _ = share.sort(dim=-1, descending=True)
    above = ranked.cumsum(-1) - ranked
    kept = (above < mass - _MASS_TOLERANCE).sum(-1, keepdim=True).clamp_min(1)
    threshold = ranked.gather(-1, kept - 1)
    return (share >= threshold).reshape(attention.shape)


def jaccard(mask: Tensor, target: Tensor) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 when both are empty)."""
    if mask.shape != target.shape:
        raise ValueError(f"mask shapes differ: {tuple(mask.shape)} vs {tuple(target.shape)}")
    mask, target = mask.bool(), target.bool()
    union = (mask | target).sum().item()
    return 1.0 if union == 0 else (mask & target).sum().item() / union


def _read_mask(path: Path) -> np.ndarray:
    """Non-zero pixels are the object; palette masks (DAVIS) count their index, not the colour."""
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img)
            has_alpha = img.mode in ("RGBA", "LA", "PA")
    except (OSError, ValueError, SyntaxError) as exc:
        raise SSLBenchError(f"{path}: not a readable mask image ({exc})") from exc
    if has_alpha:
        arr = arr[..., :-1]
    return arr.any(-1) if arr.ndim == 3 else arr != 0


def _crop_box(transform: Any, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The region of an image of ``size`` (w, h) that the eval transform's resize + centre crop keeps."""
    width, height = size
    box = (0.0, 0.0, float(width), float(height))
    steps = getattr(transform, "transforms", [])
    resize = next((t for t in steps if isinstance(t, T.Resize)), None)
    crop = next((t for t in steps if isinstance(t, T.CenterCrop)), None)
    if resize is not None and crop is not None and isinstance(resize.size, int):
        scale = resize.size / min(width, height)
        crop_h, crop_w = crop.size
        new_w, new_h = int(width * scale), int(height * scale)
        left, top = round((new_w - crop_w) / 2), round((new_h - crop_h) / 2)
        box = (left / scale, top / scale, (left + crop_w) / scale, (top + crop_h) / scale)
    x0, y0 = max(0, round(box[0])), max(0, round(box[1]))
    return x0, y0, min(width, max(x0 + 1, round(box[2]))), min(height, max(y0 + 1, round(box[3])))


def _to_pixels(grid: Tensor, patch: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """(..., h, w) patch maps repeated to pixels (nearest) and cropped to ``size`` (h, w): padding drops."""
    pixels = grid.repeat_interleave(patch[0], dim=-2).repeat_interleave(patch[1], dim=-1)
    return pixels[..., : size[0], : size[1]]


def _default_images(data: Any, num_images: int, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """A fixed, class-balanced sample of the test split: one image per class in turn, seeded."""
    labels = np.asarray(data.test.labels)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rounds = max(map(len, per_class), default=0)
    order = [int(idx[r]) for r in range(rounds) for idx in per_class if r < len(idx)]
    return [(data.test.load(i), f"test #{i} ({data.classes[labels[i]]})") for i in order[:num_images]]


def _run_dataset(run: Path, pairs: list[tuple[Path, dict[str, Any]]]) -> tuple[dict[str, Any], Any]:
    """The run's config and dataset (its test split for default images, its mean/std for normalising)."""
    path = run / "config.yaml"
    try:
        config = dict((yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}) or {})
    except (OSError, yaml.YAMLError) as exc:
        raise SSLBenchError(f"{path}: unreadable ({exc})") from exc
    name = config.get("dataset") or (pairs[0][1].get("protocol") or {}).get("dataset")
    if not name:
        raise SSLBenchError(f"{path}: names no dataset (key 'dataset'), so images cannot be normalised")
    return config, load_dataset(name, config.get("data_root"), config.get("image_size"))


def _load_pair(folder: Path, arch: str, image_size: int) -> Backbone:
    weights = folder / "backbone.pt"
    backbone = create_backbone(arch, image_size)
    try:
        backbone.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as exc:  # a truncated or foreign file fails in many ways; each is the user's to fix
        raise SSLBenchError(f"{weights}: not a {arch} backbone at {image_size} px ({exc})") from exc
    return backbone.eval()


def _vit_pairs(run: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Ok ViT pairs with their eval.json; others are skipped with a warning naming them."""
    pairs, not_vit = [], []
    for folder in sorted(p for p in run.iterdir() if p.is_dir() and (p / "eval.json").is_file()):
        try:
            ev = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping '{folder}': unreadable eval.json ({exc})", stacklevel=3)
            continue
        spec = ARCHS.get(str(ev.get("arch")))
        if ev.get("status", "ok") != "ok" or spec is None:
            reason = f"status {ev.get('status')}, arch {ev.get('arch')}"
            warnings.warn(f"skipping '{folder.name}': {reason}", stacklevel=3)
        elif spec.family != "vit":
            not_vit.append(folder.name)
        elif not (folder / "backbone.pt").is_file():
            raise SSLBenchError(f"{folder / 'backbone.pt'}: no such file (the pair's trained backbone)")
        else:
            pairs.append((folder, ev))
    if not_vit:
        message = f"{', '.join(not_vit)}: no attention to show (attention maps need a ViT arch)"
        if not pairs:
            raise SSLBenchError(f"{run}: no ViT pair, so no attention to show; {message}")
        warnings.warn(f"skipping {message}", stacklevel=3)
    if not pairs:
        raise SSLBenchError(f"{run}: no finished ViT pair (<method>-<arch>/eval.json with status ok)")
    return pairs


@dataclass
class _PairMaps:
    """One pair's figure: the model's input batch, its attention and mass masks, per-head scores."""

    title: str
    batch: Tensor
    attention: Tensor
    masks: Tensor
    patch: tuple[int, int]
    names: list[str]
    scores: list[list[float]] | None = None


def _plot(maps: _PairMaps, mean: Any, std: Any, mass: float, path: Path) -> None:
    """Rows = images; columns = the image as the model saw it, each head, the union of the heads' masks."""
    rows, heads = maps.attention.shape[:2]
    size = tuple(maps.batch.shape[-2:])
    shown = (maps.batch * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).clamp(0, 1)
    pixels = _to_pixels(maps.attention, maps.patch, size).numpy()
    union = _to_pixels(maps.masks.any(1).float(), maps.patch, size).numpy()
    fig = Figure(figsize=(1.7 * (heads + 2), 1.8 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(maps.title, fontsize=11)
    axes = fig.subplots(rows, heads + 2, squeeze=False)
    columns = ["image", *[f"head {h + 1}" for h in range(heads)], f"mask ({mass:.0%} mass)"]
    for r in range(rows):
        image = shown[r].permute(1, 2, 0).numpy()
        overlay = np.zeros((*size, 4))
        overlay[..., 3] = 0.65 * (1.0 - union[r])  # dim what the heads' masks leave out
        for c, ax in enumerate(axes[r]):
            ax.set(xticks=[], yticks=[])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
            if c == 0:
                ax.imshow(image, interpolation="bilinear")
                ax.set_ylabel(maps.names[r], fontsize=8)
            elif c <= heads:
                ax.imshow(pixels[r, c - 1], cmap="inferno", interpolation="nearest")
                if maps.scores is not None:
                    ax.set_xlabel(f"Jaccard {maps.scores[r][c - 1]:.2f}", fontsize=8)
            else:
                ax.imshow(image, interpolation="bilinear")
                ax.imshow(overlay, interpolation="nearest")
                if 0 < union[r].mean() < 1:
                    ax.contour(union[r], levels=[0.5], colors="yellow", linewidths=1.0)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _jaccard_scores(maps: _PairMaps, transform: Any, sources: list, targets: list) -> list[list[float]]:
    """Per image, per head: Jaccard of the head's mass mask and the object mask within the model's crop."""
    pixels = _to_pixels(maps.masks.float(), maps.patch, tuple(maps.batch.shape[-2:]))
    scores = []
    for i, ((image, _), target) in enumerate(zip(sources, targets, strict=True)):
        x0, y0, x1, y1 = _crop_box(transform, image.size)
        region = torch.from_numpy(target[y0:y1, x0:x1])
        heads = F.interpolate(pixels[i : i + 1], size=tuple(region.shape), mode="nearest")[0]
        scores.append([jaccard(h > 0.5, region) for h in heads])
    return scores


def write_attention_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    image_paths: Sequence[str | Path] = (),
    mask_paths: Sequence[str | Path] = (),
    mass: float = 0.6,
    num_images: int = 6,
) -> list[Path]:
    """One PNG grid per ok ViT pair in out_dir (default RUN/attention/), plus attention.json with Jaccard
    scores when masks are given; returns the written paths."""
    run = Path(run_dir)
    if not run.is_dir():
        problem = "is not a folder" if run.exists() else "does not exist"
        raise SSLBenchError(f"run folder '{run}' {problem} (expected results/<run>/)")
    if not 0.0 < mass <= 1.0 or num_images < 1:
        raise SSLBenchError(f"need 0 < mass <= 1 and num_images >= 1, got {mass} and {num_images}")
    if mask_paths and len(mask_paths) != len(image_paths):
        raise SSLBenchError(f"{len(mask_paths)} masks for {len(image_paths)} images: give one mask per image")
    out = Path(out_dir) if out_dir is not None else run / "attention"
    pairs = _vit_pairs(run)
    config, data = _run_dataset(run, pairs)
    mean, std = data.mean, data.std
    if image_paths:
        sources = [(read_rgb(p, p), Path(p).name) for p in image_paths]
    else:
        sources = _default_images(data, num_images)
    targets = [_read_mask(Path(p)) for p in mask_paths]
    for (image, name), target, path in zip(sources[: len(targets)], targets, mask_paths, strict=True):
        if target.shape != (image.height, image.width):
            size = f"{target.shape[1]}x{target.shape[0]}"
            raise SSLBenchError(f"{path}: mask is {size} but image {name} is {image.width}x{image.height}")
    written: list[Path] = []
    summary: dict[str, Any] = {}
    for folder, ev in pairs:
        image_size = int((ev.get("protocol") or {}).get("image_size") or data.image_size)
        backbone = _load_pair(folder, ev["arch"], image_size)
        transform = build_eval_transform(image_size, mean, std)
        batch = torch.stack([transform(image) for image, _ in sources])
        attention = cls_attention(backbone, batch)
        variant = f" ({ev['variant']})" if ev.get("variant") else ""
        maps = _PairMaps(
            f"{ev.get('method', folder.name)}{variant} / {ev['arch']}: last-block class-token attention",
            batch, attention, mass_mask(attention, mass), tuple(backbone.model.patch_embed.patch_size),
            [name for _, name in sources],
        )  # fmt: skip
        if targets:
            maps.scores = _jaccard_scores(maps, transform, sources, targets)
            per_image = [
                {"image": str(im), "mask": str(mk), "heads": s, "mean_heads": float(np.mean(s)),
                 "best_head": max(s)}
                for im, mk, s in zip(image_paths, mask_paths, maps.scores, strict=True)
            ]  # fmt: skip
            summary[folder.name] = {
                "method": ev.get("method"), "arch": ev["arch"], "variant": ev.get("variant"),
                "images": per_image, "mean_heads": float(np.mean([p["mean_heads"] for p in per_image])),
                "best_head": float(np.mean([p["best_head"] for p in per_image])),
            }  # fmt: skip
        written.append(make_folder(out, "attention folder") / f"{folder.name}.png")  # a file there: one line
        _plot(maps, mean, std, mass, written[-1])
    if targets:
        note = "IoU of each head's mass mask and the object mask, over the centre crop the model sees"
        written.append(out / "attention.json")
        write_json_atomic(written[-1], {"mass": mass, "jaccard": note, "pairs": summary})
    return written
