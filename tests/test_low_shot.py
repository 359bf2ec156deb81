"""Low-shot settings: parsing, balanced seeded subsets, SimCLR split files, and the per-setting record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sslbench.base.errors import SSLBenchError
from sslbench.evaluation.low_shot import LowShotSetting, low_shot_evaluation, parse_low_shot

PROBE = {
    "ks": (1, 5, 20),
    "headline_k": 5,
    "temperature": 0.07,
    "linear_lrs": (0.1, 1.0),
    "linear_epochs": 10,
    "val_fraction": 0.1,
    "seed": 0,
    "device": "cpu",
    "resamples": 200,
}


def _features(
    per_class: int, num_classes: int = 5, seed: int = 0
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Class means plus noise: separable, with a wider 'linear' kind as a ViT's concatenated tokens."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat(per_class)
    means = torch.randn(num_classes, 16, generator=torch.Generator().manual_seed(99)) * 3.0
    knn = means[labels] + torch.randn(labels.numel(), 16, generator=g)
    linear = torch.cat([knn, torch.randn(labels.numel(), 4, generator=g)], dim=1)
    return {"knn": knn, "linear": linear}, labels


def _class_counts(labels: np.ndarray, chosen: np.ndarray) -> list[int]:
    return np.bincount(labels[chosen], minlength=labels.max() + 1).tolist()


@pytest.mark.parametrize(
    ("spec", "percent", "per_class", "protocols"),
    [
        ("1%", 1.0, None, ("knn", "linear")),
        ("10%", 10.0, None, ("knn", "linear")),
        (" 2.5% ", 2.5, None, ("knn", "linear")),
        ("100%", 100.0, None, ("knn", "linear")),
        ("5/class", None, 5, ("knn",)),
    ],
)
def test_parse_low_shot(spec: str, percent: float | None, per_class: int | None, protocols: tuple) -> None:
    setting = parse_low_shot(spec)
    assert (setting.name, setting.percent, setting.per_class, setting.split_file) == (
        spec,
        percent,
        per_class,
        None,
    )
    assert setting.protocols == protocols


@pytest.mark.parametrize("spec", ["0%", "101%", "-1%", "ten%", "0/class", "5/img", "5", "file:", ""])
def test_bad_spec_lists_the_spellings(spec: str) -> None:
    with pytest.raises(SSLBenchError, match=r"unknown low-shot setting .*'1%'.*'5/class'.*'file:PATH'"):
        parse_low_shot(spec)


def test_file_spec_needs_an_existing_file(tmp_path: Path) -> None:
    split = tmp_path / "1percent.txt"
    split.write_text("a.JPEG\n")
    setting = parse_low_shot(f"file:{split}")
    assert (setting.name, setting.split_file, setting.protocols) == (
        f"file:{split}",
        split,
        ("knn", "linear"),
    )
    with pytest.raises(SSLBenchError, match="not found"):
        parse_low_shot(f"file:{tmp_path / 'missing.txt'}")


def test_shares_are_balanced_sized_sorted_and_nested() -> None:
    labels = np.repeat(np.arange(5), 200)
    np.random.default_rng(0).shuffle(labels)
    one, ten = parse_low_shot("1%").select(labels, seed=3), parse_low_shot("10%").select(labels, seed=3)
    assert _class_counts(labels, one) == [2] * 5  # 1% of 200 per class
    assert _class_counts(labels, ten) == [20] * 5
    assert np.all(np.diff(one) > 0) and one.dtype == np.int64
    assert set(one) <= set(ten)  # one seed: the smaller setting is the head of the same order
    assert _class_counts(labels, parse_low_shot("0.1%").select(labels, seed=3)) == [1] * 5  # at least one
    assert _class_counts(labels, parse_low_shot("7/class").select(labels, seed=3)) == [7] * 5
    uneven = np.array([0] * 100 + [1] * 300 + [2] * 5)
    assert _class_counts(uneven, parse_low_shot("10%").select(uneven, seed=0)) == [10, 30, 1]


def test_subsets_are_seeded() -> None:
    labels = np.repeat(np.arange(4), 50)
    setting = parse_low_shot("10%")
    assert np.array_equal(setting.select(labels, seed=1), setting.select(labels, seed=1))
    assert not np.array_equal(setting.select(labels, seed=1), setting.select(labels, seed=2))
    assert not np.array_equal(
        parse_low_shot("3/class").select(labels, 1), parse_low_shot("3/class").select(labels, 2)
    )


def test_n_per_class_beyond_a_class_size_says_which_class() -> None:
    labels = np.array([0] * 10 + [1] * 3)
    with pytest.raises(SSLBenchError, match="5 labelled images of every class, but class 1 has 3"):
        parse_low_shot("5/class").select(labels, seed=0)


def _split_file(tmp_path: Path, lines: list[str]) -> LowShotSetting:
    path = tmp_path / "subset.txt"
    path.write_text("\n".join(lines) + "\n\n")
    return parse_low_shot(f"file:{path}")


def test_split_file_selects_by_base_name(tmp_path: Path) -> None:
    names = [f"/data/train/n0{i % 3}/n0{i % 3}_{i}.JPEG" for i in range(12)]
    labels = np.arange(12) % 3
    setting = _split_file(tmp_path, ["n00_9.JPEG", "n01_1.JPEG", "n00_9.JPEG", "n02_5.JPEG"])
    assert setting.select(labels, seed=0, names=names).tolist() == [1, 5, 9]
    assert setting.select(labels, seed=7, names=names).tolist() == [1, 5, 9]  # the file, not the seed


def test_split_file_errors(tmp_path: Path) -> None:
    labels = np.arange(6) % 2
    names = [f"img_{i}.JPEG" for i in range(6)]
    with pytest.raises(SSLBenchError, match="this dataset has no file names"):
        _split_file(tmp_path, ["img_1.JPEG"]).select(labels, seed=0, names=None)
    missing = _split_file(tmp_path, ["img_1.JPEG", "x_1.JPEG", "x_2.JPEG", "x_3.JPEG", "x_4.JPEG"])
    with pytest.raises(SSLBenchError, match=r"4 of the 5 images .* not in the labelled bank of 6 images "
                       r"\(first: x_1.JPEG, x_2.JPEG, x_3.JPEG\)"):  # fmt: skip
        missing.select(labels, seed=0, names=names)
    with pytest.raises(SSLBenchError, match="names no images"):
        _split_file(tmp_path, []).select(labels, seed=0, names=names)
    twice = ["a/img_0.JPEG", "b/img_0.JPEG", "img_2.JPEG", "img_3.JPEG", "img_4.JPEG", "img_5.JPEG"]
    with pytest.raises(SSLBenchError, match="match more than one bank image"):
        _split_file(tmp_path, ["img_0.JPEG"]).select(labels, seed=0, names=twice)


def test_low_shot_evaluation_records(tmp_path: Path) -> None:
    bank, bank_y = _features(per_class=40, seed=0)
    test, test_y = _features(per_class=20, seed=1)
    names = [f"n{int(y)}_{i}.JPEG" for i, y in enumerate(bank_y)]
    split = tmp_path / "listed.txt"
    split.write_text("\n".join(names[:15]))  # the first 15 images: 3 of each class
    settings = ["10%", "1/class", "5%", "2%", f"file:{split}"]
    records = low_shot_evaluation(settings, bank, bank_y, test, test_y, 5, bank_names=names, **PROBE)
    assert list(records) == settings
    for name, record in records.items():
        assert set(record) == {"bank_images", "knn", "knn_ci95", "linear"}
        assert set(record["knn"]) == set(record["knn_ci95"]) == {"1", "5", "20"}
        for k, top1 in record["knn"].items():
            low, high = record["knn_ci95"][k]
            assert low <= top1 <= high, name
    assert [records[name]["bank_images"] for name in settings] == [20, 5, 10, 5, 15]
    ten = records["10%"]
    assert ten["knn"]["5"] > 90.0
    assert set(ten["linear"]) == {"top1", "ci95", "best_lr", "lr_chosen_on"}
    assert ten["linear"]["top1"] > 90.0 and ten["linear"]["best_lr"] in PROBE["linear_lrs"]
    assert (
        ten["linear"]["lr_chosen_on"]
        == "held-out 25% of the subset (one image of its smallest class; 10%: none)"  # 4 per class
    )
    assert records["1/class"]["linear"] is None  # k-NN only
    assert 0.0 <= records["1/class"]["knn"]["5"] <= 100.0
    assert records["5%"]["linear"]["lr_chosen_on"].startswith("held-out 50%")  # 2 per class
    assert "by rule" in records["2%"]["linear"]["lr_chosen_on"]  # 1 per class: nothing to hold out
    assert records["2%"]["linear"]["best_lr"] == 1.0  # the larger middle lr of (0.1, 1.0)
    assert records[f"file:{split}"]["linear"]["top1"] > 80.0
    again = low_shot_evaluation(settings[:2], bank, bank_y, test, test_y, 5, bank_names=names, **PROBE)
    assert again == {name: records[name] for name in settings[:2]}


def test_low_shot_evaluation_without_linear_features_and_bad_input() -> None:
    bank, bank_y = _features(per_class=20, seed=0)
    test, test_y = _features(per_class=4, seed=1)
    knn_only = {"knn": bank["knn"]}
    records = low_shot_evaluation(["50%"], knn_only, bank_y.numpy(), test, test_y, 5, **PROBE)
    assert records["50%"]["linear"] is None and records["50%"]["bank_images"] == 50
    with pytest.raises(SSLBenchError, match="headline k 7 must be one of"):
        low_shot_evaluation(["50%"], bank, bank_y, test, test_y, 5, **{**PROBE, "headline_k": 7})
    with pytest.raises(SSLBenchError, match="listed twice"):
        low_shot_evaluation(["50%", "50%"], bank, bank_y, test, test_y, 5, **PROBE)
    with pytest.raises(SSLBenchError, match="valid spellings"):
        low_shot_evaluation(["half"], bank, bank_y, test, test_y, 5, **PROBE)
