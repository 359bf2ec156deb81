"""Intervals, seeds and marks in the report, on hand-written eval.json trees: no training, a few seconds."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.container import ErrorbarContainer

from sslbench.reporting.intervals import (
    BEST_NOTE,
    INTERVAL_NOTE,
    LINEAR_NOTE,
    NEAR_BASELINE_NOTE,
    estimate,
    format_estimate,
    row_label,
)
from sslbench.reporting.summary_plot import summary_figure, summary_plot_data
from sslbench.reporting.tables import (
    comparison_table,
    format_table_text,
    linear_note,
    load_results,
    low_shot_table,
    protocol_summary,
    write_report,
)

VIT = "vit_s16"


def _ev(
    method: str,
    knn: float | None,
    linear: float | None,
    *,
    seed: int = 0,
    width: float | None = 2.0,
    arch: str = VIT,
    **fields: Any,
) -> dict[str, Any]:
    """An eval.json as the evaluation writes it; intervals are value ± width (none when width is None)."""
    protocol = {"dataset": "cifar10", "seed": seed, "knn_k": 20, "knn_temperature": 0.07, "epochs": 2,
                **fields.pop("protocol", {})}  # fmt: skip
    ev: dict[str, Any] = {"method": method, "arch": arch, "seed": seed, "status": "ok",
                          "knn": {"10": knn, "20": knn}, "linear": {"top1": linear, "best_lr": 0.1},
                          "protocol": protocol, **fields}  # fmt: skip
    if width is not None:
        ev["knn_ci95"] = {"20": [knn - width, knn + width]} if knn is not None else {}
        if linear is not None:
            ev["linear"]["ci95"] = [linear - width, linear + width]
    return ev


def _write(run: Path, ev: dict[str, Any], *, seeded: bool = False, name: str | None = None) -> Path:
    """One pair folder; ``seeded`` names it as one seed of several (``<method>-<arch>-seed<N>``)."""
    folder = run / (name or f"{ev['method']}-{ev['arch']}" + (f"-seed{ev['seed']}" if seeded else ""))
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps(ev), encoding="utf-8")
    return folder


def _load(*runs: Path) -> pd.DataFrame:
    """Load with every warning an error: seeds of one pair must not read as replacements."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_results(list(runs))


def _tree(tmp_path: Path, evs: list[dict[str, Any]], *, seeded: bool = False) -> pd.DataFrame:
    run = tmp_path / "run"
    for ev in evs:
        _write(run, ev, seeded=seeded)
    return _load(run)


def _cell(df: pd.DataFrame, label: str, metric: str, arch: str = VIT) -> str:
    return comparison_table(df).loc[label, (arch, metric)]


def test_single_seed_cells_carry_the_interval(tmp_path: Path) -> None:
    ev = _ev("dino", 24.1, 30.6)
    ev["knn_ci95"] = {"10": [22.0, 25.9], "20": [22.3, 26.0]}
    ev["linear"]["ci95"] = [28.5, 32.7]
    df = _tree(tmp_path, [ev])
    assert _cell(df, "dino", "k-NN") == "24.1 [22.3, 26.0]"
    assert _cell(df, "dino", "linear") == "30.6 [28.5, 32.7]"
    text = format_table_text(df)
    assert "24.1 [22.3, 26.0]" in text and INTERVAL_NOTE in text and BEST_NOTE in text
    assert "- seed: 0" in text


def test_three_seeds_give_mean_std_and_the_mean_of_the_bounds(tmp_path: Path) -> None:
    evs = [_ev("dino", 40.0 + s, 30.0 + s, seed=s, width=2.0 + s) for s in (0, 1, 2)]
    df = _tree(tmp_path, evs, seeded=True)
    assert len(df) == 3 and list(df["seed"]) == [0, 1, 2]
    # linear 30, 31, 32: mean 31, sample std 1; bounds [28, 32], [28, 34], [28, 36] -> [28, 34]
    assert _cell(df, "dino", "linear") == "31.0 ± 1.0 [28.0, 34.0]"
    assert _cell(df, "dino", "k-NN") == "41.0 ± 1.0 [38.0, 44.0]"
    assert "seeds: 0, 1, 2 (mean ± std over 3)" in protocol_summary(df)
    text = format_table_text(df)
    assert "mean of the seeds' lower bounds and the mean of their upper bounds" in text


def test_a_failed_seed_leaves_the_others_with_their_n(tmp_path: Path) -> None:
    evs = [_ev("dino", 40.0 + s, 30.0 + 2 * s, seed=s) for s in (0, 1, 2)]
    evs[2] = {**evs[2], "status": "failed", "error": "out of memory", "knn": None, "linear": None}
    evs += [_ev("byol", 20.0 + s, 30.0, seed=s) for s in (0, 1, 2)]
    df = _tree(tmp_path, evs, seeded=True)
    assert _cell(df, "dino", "linear") == "31.0 ± 1.4 [29.0, 33.0] (n=2)"
    assert _cell(df, "byol", "linear") == "30.0 ± 0.0 [28.0, 32.0]"  # overlaps: no bold
    assert "dino/vit_s16 seed 2 (run run): out of memory" in format_table_text(df)


def test_estimate_rules() -> None:
    assert estimate([(float("nan"), 1.0, 2.0)]) is None
    partial = estimate([(30.0, 28.0, 32.0), (32.0, float("nan"), float("nan"))])
    assert partial is not None and not partial.has_interval  # half an interval is no interval
    assert format_estimate(partial, usual_n=2) == "31.0 ± 1.4"


def test_best_is_bold_only_when_its_interval_clears_every_other(tmp_path: Path) -> None:
    separated = _tree(tmp_path / "a", [_ev("dino", 42.0, 50.0), _ev("byol", 30.0, 40.0),
                                       _ev("simclr", 31.0, 47.0), _ev("supervised", 80.0, 90.0)])  # fmt: skip
    assert _cell(separated, "dino", "k-NN") == "**42.0 [40.0, 44.0]**"
    assert _cell(separated, "supervised", "k-NN") == "80.0 [78.0, 82.0]"  # a reference, never bold
    assert _cell(separated, "byol", "k-NN") == "30.0 [28.0, 32.0]"
    # linear: dino [48, 52] overlaps simclr [45, 49], so nothing is marked
    assert not any("**" in cell for cell in comparison_table(separated).xs("linear", axis=1, level=1).stack())

    overlapping = _tree(tmp_path / "b", [_ev("dino", 42.0, 50.0, width=9.0), _ev("byol", 36.0, 40.0)])
    assert _cell(overlapping, "dino", "k-NN") == "42.0 [33.0, 51.0]"
    alone = _tree(tmp_path / "c", [_ev("dino", 42.0, 50.0), _ev("random", 10.0, 12.0)])
    assert "**" not in _cell(alone, "dino", "k-NN")  # one competitor: nothing to be best among


def test_row_within_random_interval_gets_the_mark(tmp_path: Path) -> None:
    df = _tree(tmp_path, [_ev("random", 10.0, 15.0), _ev("byol", 11.0, 30.0), _ev("dino", 40.0, 50.0)])
    assert _cell(df, "byol", "k-NN") == "11.0 [9.0, 13.0] ≈"
    assert _cell(df, "byol", "linear") == "30.0 [28.0, 32.0]"
    assert _cell(df, "random", "k-NN") == "10.0 [8.0, 12.0]"
    assert _cell(df, "dino", "k-NN") == "**40.0 [38.0, 42.0]**"
    text = format_table_text(df)
    assert text.count(NEAR_BASELINE_NOTE) == 1


def test_old_eval_json_renders_exactly_as_before(tmp_path: Path) -> None:
    """No intervals, no top-level seed: today's cells and text, byte for byte."""
    evs = []
    for method, knn, linear in (("dino", 45.0, 55.0), ("random", 12.5, 20.25)):
        ev = _ev(method, knn, linear, width=None, arch="resnet18")
        ev["knn"] = {"10": knn - 1, "20": knn}
        del ev["seed"]
        evs.append(ev)
    df = _tree(tmp_path, evs)
    assert format_table_text(df) == (
        "| method   |   resnet18 / linear |   resnet18 / k-NN |\n"
        "|----------|---------------------|-------------------|\n"
        "| dino     |                55.0 |              45.0 |\n"
        "| random   |                20.2 |              12.5 |\n\n"
        f"{LINEAR_NOTE}\n\nProtocol:\n- knn_k: 20\n- knn_temperature: 0.07\n- feature_source: not recorded\n"
        "- crops: not recorded\n- epochs: 2\n- batch_size: not recorded\n- precision: not recorded\n"
        "- dataset: cifar10\n- seed: 0\n"
    )
    write_report(df, tmp_path / "out")
    tex = (tmp_path / "out" / "table.tex").read_text(encoding="utf-8")
    assert "dino & 55.0 & 45.0 \\\\\nrandom & 20.2 & 12.5 \\\\" in tex and "textbf" not in tex


def test_summary_csv_has_seed_and_interval_columns(tmp_path: Path) -> None:
    evs = [_ev("dino", 40.0 + s, 30.0, seed=s) for s in (0, 1)]
    df = _tree(tmp_path, evs, seeded=True)
    write_report(df, tmp_path / "out")
    back = pd.read_csv(tmp_path / "out" / "summary.csv")
    for column in ["seed", "knn_20", "knn_20_lo", "knn_20_hi", "knn_10_lo", "linear_top1", "linear_lo",
                   "linear_hi"]:  # fmt: skip
        assert column in back.columns, column
    assert list(back["seed"]) == [0, 1]
    assert list(back["knn_20_lo"]) == [38.0, 39.0] and list(back["linear_hi"]) == [32.0, 32.0]
    assert back["knn_10_lo"].isna().all()  # only k=20 recorded an interval
    assert comparison_table(back).equals(comparison_table(df))
    assert protocol_summary(back) == protocol_summary(df)


def test_seeds_and_reruns_between_runs(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    _write(first, _ev("dino", 40.0, 30.0, seed=0))
    _write(second, _ev("dino", 44.0, 30.0, seed=1))
    assert len(_load(first, second)) == 2  # another seed adds a row, silently
    _write(second, _ev("byol", 20.0, 30.0, seed=0))
    _write(first, _ev("byol", 10.0, 30.0, seed=0))
    with pytest.warns(UserWarning, match="byol/vit_s16 seed 0 from run 'a' is replaced by run 'b'"):
        merged = load_results([first, second])
    assert merged.loc[merged["method"] == "byol", "knn_20"].tolist() == [20.0]
    older = tmp_path / "c"  # a file from before the seed field: it cannot be told from either seed
    _write(older, {k: v for k, v in _ev("dino", 50.0, 30.0).items() if k != "seed"})
    with pytest.warns(UserWarning) as record:
        merged = load_results([first, second, older])
    assert {str(w.message) for w in record} == {
        "byol/vit_s16 seed 0 from run 'a' is replaced by run 'b'",
        "dino/vit_s16 seed 0 from run 'a' is replaced by run 'c'",
        "dino/vit_s16 seed 1 from run 'b' is replaced by run 'c'",
    }
    assert merged.loc[merged["method"] == "dino", "knn_20"].tolist() == [50.0]


def test_seed_folders_back_up_a_missing_method_arch_and_seed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("methods: [dino, byol]\narchs: [vit_s16]\n", encoding="utf-8")
    for method in ("byol", "dino"):
        for seed in (10, 2):
            ev = _ev(method, 40.0 + seed, 30.0, seed=seed)
            folder = _write(run, ev, seeded=True)
            bare = {k: v for k, v in ev.items() if k not in ("method", "arch", "seed")}
            (folder / "eval.json").write_text(json.dumps(bare), encoding="utf-8")
    df = _load(run)
    assert list(zip(df["method"], df["arch"], df["seed"], strict=True)) == [
        ("dino", VIT, 2), ("dino", VIT, 10), ("byol", VIT, 2), ("byol", VIT, 10)]  # fmt: skip


def test_foreign_weights_row_label_and_note(tmp_path: Path) -> None:
    weights = {"format": "DINO checkpoint", "source": "dino_deitsmall16_pretrain.pth", "part": "teacher",
               "partial": True}  # fmt: skip
    run = tmp_path / "run"
    _write(run, _ev("dino", 40.0, 50.0))
    _write(run, _ev("dino", 70.0, 75.0, weights=weights), name="dino-vit_s16-weights")
    df = _load(run)
    label = "dino (weights: dino_deitsmall16_pretrain.pth)"
    assert row_label(_ev("dino", 1.0, 1.0, weights=weights)) == label
    assert list(comparison_table(df).index) == ["dino", label]
    text = format_table_text(df)
    assert f"- {label}/vit_s16: DINO checkpoint, teacher, partial:" in text
    assert not any(line.startswith("weights_") for line in protocol_summary(df))


def _low_shot(knn: float, linear: float | None) -> dict[str, Any]:
    return {
        "1%": {"bank_images": 10, "knn": {"20": knn}, "knn_ci95": {"20": [knn - 3, knn + 3]},
               "linear": None if linear is None else {"top1": linear, "ci95": [linear - 3, linear + 3],
                                                      "best_lr": 0.1}},
        "5/class": {"bank_images": 50, "knn": {"20": knn + 5}, "knn_ci95": {"20": [knn + 2, knn + 8]},
                    "linear": None},
    }  # fmt: skip


def test_low_shot_table(tmp_path: Path) -> None:
    df = _tree(
        tmp_path,
        [
            _ev("dino", 40.0, 50.0, low_shot=_low_shot(18.2, 20.1)),
            _ev("byol", 30.0, 40.0, low_shot=_low_shot(8.0, None)),
            _ev("simclr", 30.0, 40.0),
        ],
    )
    table = low_shot_table(df)
    assert table is not None
    assert list(table.columns) == [(VIT, "1% (10 images)", "linear"), (VIT, "1% (10 images)", "k-NN"),
                                   (VIT, "5/class (50 images)", "k-NN")]  # fmt: skip
    assert list(table.index) == ["byol", "dino"]  # folder order; simclr has no low-shot result
    assert table.loc["dino", (VIT, "1% (10 images)", "k-NN")] == "**18.2 [15.2, 21.2]**"
    assert table.loc["dino", (VIT, "1% (10 images)", "linear")] == "20.1 [17.1, 23.1]"
    assert table.loc["byol", (VIT, "1% (10 images)", "linear")] == "–"
    assert table.loc["byol", (VIT, "5/class (50 images)", "k-NN")] == "13.0 [10.0, 16.0]"
    text = format_table_text(df)
    assert "Low-shot:" in text and "vit_s16 / 5/class (50 images) / k-NN" in text
    write_report(df, tmp_path / "out")
    assert "low_shot:1%:knn_20_lo" in pd.read_csv(tmp_path / "out" / "summary.csv").columns
    assert "tab:sslbench-low-shot" in (tmp_path / "out" / "table.tex").read_text(encoding="utf-8")
    assert low_shot_table(_tree(tmp_path / "none", [_ev("dino", 40.0, 50.0)])) is None


def test_latex_marks(tmp_path: Path) -> None:
    evs = [_ev(m, knn + s, 50.0 + s, seed=s) for m, knn in (("dino", 60.0), ("byol", 40.0), ("random", 39.0))
           for s in (0, 1)]  # fmt: skip
    df = _tree(tmp_path, evs, seeded=True)
    write_report(df, tmp_path / "out")
    tex = (tmp_path / "out" / "table.tex").read_text(encoding="utf-8")
    assert "\\textbf{60.5 $\\pm$ 0.7 [58.5, 62.5]}" in tex
    assert "40.5 $\\pm$ 0.7 [38.5, 42.5] $\\approx$" in tex
    assert "**" not in tex and "\\begin{tabular}" in tex


def test_plot_has_asymmetric_error_bars_and_seed_dots(tmp_path: Path) -> None:
    evs = [_ev("dino", 40.0 + s, 50.0, seed=s) for s in (0, 1, 2)]
    for ev in evs:
        ev["knn_ci95"]["20"] = [ev["knn"]["20"] - 1.0, ev["knn"]["20"] + 3.0]
    evs += [_ev("byol", 30.0, 45.0, seed=s) for s in (0, 1, 2)]
    df = _tree(tmp_path, evs, seeded=True)
    figure = summary_figure(summary_plot_data(df))
    knn_axes = figure.axes[0]
    [bars] = [c for c in knn_axes.containers if isinstance(c, ErrorbarContainer)]
    [lines] = [c for c in knn_axes.collections if isinstance(c, LineCollection)]
    assert lines in bars.lines[2]
    spans = sorted((round(seg[0][1], 6), round(seg[1][1], 6)) for seg in lines.get_segments())
    assert spans == [(28.0, 32.0), (40.0, 44.0)]  # byol [28, 32]; dino mean 41, bounds [40, 44]
    dots = [c for c in knn_axes.collections if isinstance(c, PathCollection)]
    assert sum(len(c.get_offsets()) for c in dots) == 6
    assert write_report(df, tmp_path / "out")[-1].name == "summary.png"
    assert (tmp_path / "out" / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "out").glob(".*tmp*"))
    edited = _ev("dino", 99.5, 50.0)
    edited["knn_ci95"]["20"] = [20.0, 22.0]  # a number outside its own interval still draws
    assert summary_figure(summary_plot_data(_tree(tmp_path / "edited", [edited]))) is not None


def test_linear_note_follows_the_protocol(tmp_path: Path) -> None:
    paper = {"linear_kind": "paper", "linear_protocol": "DINO linear eval: ...; 100 epochs, batch 1024"}
    probe = {"linear_kind": "probe", "linear_protocol": "SGD on standardised frozen features, 50 epochs"}
    all_paper = _tree(tmp_path / "a", [_ev("dino", 40.0, 50.0, protocol=paper),
                                       _ev("byol", 30.0, 40.0, protocol=paper)])  # fmt: skip
    note = linear_note(all_paper)
    assert note.startswith("Linear: the DINO paper's linear protocol") and "100 epochs" in note
    assert note in format_table_text(all_paper) and LINEAR_NOTE not in format_table_text(all_paper)
    assert linear_note(_tree(tmp_path / "b", [_ev("dino", 40.0, 50.0, protocol=probe)])) == LINEAR_NOTE
    assert linear_note(_tree(tmp_path / "c", [_ev("dino", 40.0, 50.0)])) == LINEAR_NOTE  # none recorded
    mixed = linear_note(_tree(tmp_path / "d", [_ev("dino", 40.0, 50.0, protocol=paper),
                                               _ev("byol", 30.0, 40.0, protocol=probe)]))  # fmt: skip
    assert "two protocols" in mixed
    assert "100 epochs" in mixed and "for dino/vit_s16;" in mixed and "for byol/vit_s16." in mixed
