"""Attention maps: exact class-token attention, the mass rule, Jaccard, and the per-run report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sslbench.base.errors import SSLBenchError
from sslbench.data.datasets import load_dataset
from sslbench.evaluation.attention import (
    _default_images,
    cls_attention,
    cls_attention_tokens,
    jaccard,
    mass_mask,
    write_attention_report,
)
from sslbench.models.backbones import create_backbone


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_backbone("vit_tiny16", 32).eval()


def test_cls_attention_matches_timm_attention_weights(vit) -> None:
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    att = cls_attention(vit, images)
    assert att.shape == (2, 3, 8, 8)
    row = cls_attention_tokens(vit, images)
    assert row.shape == (2, 3, 1 + 64)
    torch.testing.assert_close(row.sum(-1), torch.ones(2, 3), atol=1e-5, rtol=0)

    attn = vit.model.blocks[-1].attn
    seen: list[torch.Tensor] = []
    handle = attn.attn_drop.register_forward_hook(lambda _m, _i, out: seen.append(out))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad():
            vit.model.forward_features(images)
    finally:
        attn.fused_attn = fused
        handle.remove()
    reference = seen[0][:, :, 0]  # (N, heads, tokens): timm's own softmax weights
    torch.testing.assert_close(row, reference, atol=1e-5, rtol=0)
    prefix = vit.model.num_prefix_tokens
    torch.testing.assert_close(att, reference[..., prefix:].reshape(2, 3, 8, 8), atol=1e-5, rtol=0)
    vit.train()
    torch.testing.assert_close(cls_attention(vit, images), att)  # computed in eval mode whatever the mode
    assert vit.training
    vit.eval()


def test_cls_attention_rejects_resnet() -> None:
    with pytest.raises(SSLBenchError, match="no attention to show"):
        cls_attention(create_backbone("resnet18", 32), torch.zeros(1, 3, 32, 32))


def test_mass_mask_keeps_smallest_set_reaching_mass() -> None:
    att = torch.zeros(1, 2, 2, 2)
    att[0, 0].view(-1)[:3] = torch.tensor([0.2, 0.5, 0.3])  # patch 1 > patch 2 > patch 0
    att[0, 1] = 0.25  # uniform head: every patch ties
    mask = mass_mask(att, 0.6)
    assert mask.shape == att.shape and mask.dtype == torch.bool
    assert mask[0, 0].view(-1).tolist() == [False, True, True, False]
    assert mask[0, 1].all()
    assert mass_mask(att, 0.5)[0, 0].view(-1).tolist() == [False, True, False, False]
    assert mass_mask(att * 7, 0.8)[0, 0].view(-1).tolist() == [False, True, True, False]  # scale-free
    assert mass_mask(att, 1.0)[0, 0].view(-1).tolist() == [True, True, True, False]
    assert mass_mask(att, 1e-9)[0, 0].sum() == 1  # at least the top patch
    with pytest.raises(SSLBenchError):
        mass_mask(att, 0.0)


def test_jaccard() -> None:
    a = torch.tensor([True, True, False, False])
    assert jaccard(a, a) == 1.0
    assert jaccard(a, ~a) == 0.0
    assert jaccard(a, torch.tensor([False, True, True, False])) == pytest.approx(1 / 3)
    assert jaccard(a, torch.tensor([True, False, False, False])) == pytest.approx(0.5)
    assert jaccard(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 1.0


def test_default_images_are_fixed_and_class_balanced() -> None:
    data = load_dataset("embedded")
    names = [name for _, name in _default_images(data, 4)]
    assert names == [name for _, name in _default_images(data, 4)]
    classes = [name.split("(")[1] for name in names]
    assert len(set(classes)) == 4


def _pair(run: Path, name: str, arch: str, weights: bool = True) -> None:
    folder = run / name
    folder.mkdir(parents=True)
    protocol = {"image_size": 32, "patch_size": 4 if arch.startswith("vit") else None, "dataset": "embedded"}
    ev = {"method": name.split("-")[0], "arch": arch, "status": "ok", "variant": None, "protocol": protocol}
    (folder / "eval.json").write_text(json.dumps(ev), encoding="utf-8")
    if weights:
        torch.manual_seed(0)
        torch.save(create_backbone(arch, 32).state_dict(), folder / "backbone.pt")


def _run(tmp_path: Path, pairs: list[tuple[str, str]]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    config = {"dataset": "embedded", "data_root": None, "image_size": None}
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    for name, arch in pairs:
        _pair(run, name, arch, weights=arch.startswith("vit"))
    return run


def test_report_default_images_and_masks(tmp_path: Path) -> None:
    run = _run(tmp_path, [("dino-vit_tiny16", "vit_tiny16"), ("byol-resnet18", "resnet18")])
    with pytest.warns(UserWarning, match="byol-resnet18"):
        written = write_attention_report(run, num_images=3)
    assert written == [run / "attention" / "dino-vit_tiny16.png"]
    assert written[0].stat().st_size > 1000
    assert Image.open(written[0]).format == "PNG"

    rng = np.random.default_rng(0)
    images, masks = [], []
    for i, size in enumerate([(40, 32), (32, 32)]):  # (w, h): one is centre-cropped by the eval transform
        images.append(tmp_path / f"img{i}.png")
        masks.append(tmp_path / f"mask{i}.png")
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(images[-1])
        mask = np.zeros((size[1], size[0]), dtype=np.uint8)
        mask[8:24, 10:26] = 255
        Image.fromarray(mask).save(masks[-1])
    out = tmp_path / "out"
    with pytest.warns(UserWarning):
        written = write_attention_report(run, out, images, masks, mass=0.6)
    assert sorted(p.name for p in written) == ["attention.json", "dino-vit_tiny16.png"]
    pair = json.loads((out / "attention.json").read_text())["pairs"]["dino-vit_tiny16"]
    assert len(pair["images"]) == 2 and all(len(im["heads"]) == 3 for im in pair["images"])
    values = [v for im in pair["images"] for v in (*im["heads"], im["mean_heads"], im["best_head"])]
    assert all(0.0 <= v <= 1.0 for v in values) and 0.0 <= pair["mean_heads"] <= pair["best_head"] <= 1.0
    assert not list(out.glob(".*.tmp"))


def test_report_errors(tmp_path: Path) -> None:
    with pytest.raises(SSLBenchError, match="does not exist"):
        write_attention_report(tmp_path / "missing")
    run = _run(tmp_path, [("byol-resnet18", "resnet18")])
    with pytest.raises(SSLBenchError, match="no attention to show"):
        write_attention_report(run)
    _pair(run, "dino-vit_tiny16", "vit_tiny16", weights=False)
    with pytest.raises(SSLBenchError, match=r"dino-vit_tiny16/backbone\.pt"):
        write_attention_report(run)
    with pytest.raises(SSLBenchError, match="one mask per image"):
        write_attention_report(run, image_paths=[], mask_paths=["m.png"])
