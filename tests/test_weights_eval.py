"""``sslbench eval`` of networks trained elsewhere, ``--seeds`` and ``--eval-dataset``, end to end.

A network trained here is reloaded from its backbone.pt and from files written in other projects'
layouts, and every one gives the trained pair's numbers exactly: the same weights under the same protocol.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_session import read_eval as _eval
from cli_session import run_cli as _main

TINY = [
    "--epochs", "1", "--batch-size", "8", "--no-progress",
    "--set", "train.train_per_class=2", "--set", "eval.train_per_class=4", "--set", "eval.test_per_class=3",
    "--set", "eval.monitor_every=0", "--set", "eval.linear_epochs=2", "--set", "train.warmup_epochs=0",
    "--set", "eval.bootstrap_resamples=200",
]  # fmt: skip
EVAL_TINY = ["--no-progress", "--set", "eval.train_per_class=4", "--set", "eval.test_per_class=3",
             "--set", "eval.linear_epochs=2", "--set", "eval.bootstrap_resamples=200"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untrained backbone (``random``: nothing to train, so this is fast) with its backbone.pt."""
    out = tmp_path_factory.mktemp("weights") / "trained"
    archs = "resnet18,vit_tiny16"
    code, _, stderr = _main(["run", "--methods", "random", "--arch", archs, *TINY, "--out", str(out)])
    assert code == 0, stderr
    return out


def _numbers(record: dict[str, Any]) -> tuple:
    return record["knn"], record.get("knn_ci95"), record["linear"]["top1"], record["linear"].get("ci95")


def test_trained_pairs_carry_intervals_and_seed(trained: Path):
    record = _eval(trained, "random-resnet18")
    assert record["seed"] == 0 and record["protocol"]["seed"] == 0
    for k, top1 in record["knn"].items():
        low, high = record["knn_ci95"][k]
        assert low <= top1 <= high
    low, high = record["linear"]["ci95"]
    assert low <= record["linear"]["top1"] <= high
    assert record["protocol"]["linear_kind"] == "probe"
    assert "bootstrap" in record["protocol"]["intervals"]
    assert "[" in (trained / "table.md").read_text()  # the printed table shows the intervals


@pytest.mark.parametrize("arch, classifier, width", [("resnet18", "fc", 512), ("vit_tiny16", "head", 192)])
def test_eval_of_foreign_layouts_gives_the_trained_numbers(
    trained: Path, tmp_path: Path, arch: str, classifier: str, width: int
):
    """backbone.pt as written, and the same weights in DINO's training-checkpoint layout and as a timm
    state dict with a classifier: each loads strictly and scores exactly what the trained pair scored
    (on a ViT too, whose attention kernel must be the one the trained pair was evaluated with)."""
    pair = f"random-{arch}"
    weights = torch.load(trained / pair / "backbone.pt", weights_only=True)
    plain = {key.removeprefix("model."): value for key, value in weights.items()}
    dino = tmp_path / "checkpoint.pth"
    teacher = {f"backbone.{k}": v for k, v in plain.items()}
    student = {f"module.backbone.{k}": v for k, v in plain.items()}
    torch.save({"teacher": teacher, "student": student, "epoch": 1}, dino)
    timm_file = tmp_path / "timm_net.pth.tar"
    width = next(
        v.shape[0] for k, v in plain.items() if k.endswith("norm.weight") or k == "layer4.1.bn2.weight"
    )
    head = {f"{classifier}.weight": torch.zeros(10, width), f"{classifier}.bias": torch.zeros(10)}
    torch.save(plain | head, timm_file)
    out = tmp_path / "eval"
    sources = [str(trained / pair / "backbone.pt"), str(dino), str(timm_file)]
    code, stdout, stderr = _main(["eval", *sources, "--arch", arch, *EVAL_TINY, "--out", str(out)])
    assert code == 0, stderr
    expected = _numbers(_eval(trained, pair))
    for folder in (pair, f"checkpoint-{arch}", f"timm_net-{arch}"):
        record = _eval(out, folder)
        assert record["status"] == "ok" and record["train"] is None
        assert _numbers(record) == expected, folder
        assert record["protocol"]["weights_format"] == record["weights"]["format"]
    assert _eval(out, f"checkpoint-{arch}")["weights"]["part"] == "teacher"
    assert "weights" in stdout  # the table's rows say where their weights came from


def test_eval_keeps_going_past_a_file_that_does_not_load(trained: Path, tmp_path: Path):
    broken = tmp_path / "broken.pth"
    torch.save({"something": torch.zeros(3)}, broken)
    good = str(trained / "random-resnet18" / "backbone.pt")
    out = tmp_path / "eval"
    code, _, stderr = _main(["eval", str(broken), good, "--arch", "resnet18", *EVAL_TINY, "--out", str(out)])
    assert code == 1 and "broken" in stderr
    assert _eval(out, "broken-resnet18")["status"] == "failed"
    assert _eval(out, "random-resnet18")["status"] == "ok"


def test_eval_needs_exactly_one_arch(trained: Path, tmp_path: Path):
    good = str(trained / "random-resnet18" / "backbone.pt")
    code, _, stderr = _main(["eval", good, "--arch", "resnet18,vit_tiny16", "--out", str(tmp_path / "x")])
    assert code == 2 and "exactly one" in stderr and stderr.count("\n") == 1


def test_seeds_repeat_every_pair_in_its_own_folder(tmp_path: Path):
    out = tmp_path / "seeds"
    code, stdout, stderr = _main(
        ["run", "--methods", "random", "--arch", "resnet18", *TINY, "--seeds", "0,1", "--out", str(out)]
    )
    assert code == 0, stderr
    seeds = [_eval(out, f"random-resnet18-seed{seed}")["seed"] for seed in (0, 1)]
    assert seeds == [0, 1]
    assert _eval(out, "random-resnet18-seed0")["knn"] != _eval(out, "random-resnet18-seed1")["knn"]
    assert "±" in stdout


def test_eval_dataset_differs_from_the_pretraining_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Pretrain on the embedded data, evaluate on an ImageFolder tree: the protocol names both."""
    from PIL import Image

    root = tmp_path / "folder"
    for split in ("train", "val"):
        for label, colour in enumerate(((250, 0, 0), (0, 250, 0))):
            (root / split / f"c{label}").mkdir(parents=True)
            for index in range(4):
                Image.new("RGB", (32, 32), colour).save(root / split / f"c{label}" / f"{index}.png")
    out = tmp_path / "transfer"
    code, _, stderr = _main(["run", "--methods", "random", "--arch", "resnet18", *TINY,
                             "--eval-dataset", f"imagefolder:{root}", "--out", str(out)])  # fmt: skip
    assert code == 0, stderr
    protocol = _eval(out, "random-resnet18")["protocol"]
    assert protocol["dataset"] == "embedded" and protocol["eval_dataset"].startswith("imagefolder:")
    assert protocol["eval_image_size"] == 32 and protocol["test_images"] == 6


def test_bad_low_shot_and_linear_settings_are_refused_before_training(tmp_path: Path):
    low_shot = ["--set", "eval.low_shot=[ten percent]", "--out", str(tmp_path / "a")]
    code, _, stderr = _main(["run", "--methods", "random", "--arch", "resnet18", *TINY, *low_shot])
    assert code == 2 and "ten percent" in stderr
    code, _, stderr = _main(["run", "--methods", "random", "--arch", "resnet18", *TINY,
                             "--set", "eval.linear=papr", "--out", str(tmp_path / "b")])  # fmt: skip
    assert code == 2 and "paper" in stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny16"])
def test_export_writes_what_timm_loads_with_the_trained_features(trained: Path, tmp_path: Path, arch: str):
    """``sslbench export RUN --pair P --format timm``: the recipe it prints builds a timm network whose
    features are the pair's backbone's, with the run's normalisation in the exported config."""
    from sslbench.models.backbones import create_backbone

    out = tmp_path / "export"
    pair = f"random-{arch}"
    code, stdout, stderr = _main(
        ["export", str(trained), "--pair", pair, "--format", "timm", "--out", str(out)]
    )
    assert code == 0, stderr
    assert "load with" in stdout
    recipe = json.loads((out / "config.json").read_text())
    assert recipe["pretrained_cfg"]["mean"] == list(_eval(trained, pair)["protocol"]["normalize_mean"])
    backbone = create_backbone(arch, 32)
    weights = torch.load(trained / pair / "backbone.pt", weights_only=True)
    backbone.load_state_dict(weights)
    backbone.eval()
    namespace: dict[str, Any] = {}
    lines = stdout.splitlines()
    start = lines.index("load with:") + 1
    recipe_lines = [line[4:] for line in lines[start:] if line.startswith("    ")]
    exec("\n".join(recipe_lines), namespace)  # the printed recipe, as a user would paste it
    model = namespace["model"].eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(images), backbone.forward_eval(images)["knn"])

    code, _, stderr = _main(["export", str(trained), "--format", "timm", "--out", str(tmp_path / "again")])
    assert code == 2 and "--pair" in stderr and "random-resnet18" in stderr
