"""What a table cell says: the seeds of a row aggregated, the test-set interval, and two marks that appear
only where the intervals can tell.

A cell's number is a top-1 % measured on a finite test set, so it carries a 95% bootstrap interval over
the test images (the evaluation writes ``knn_ci95`` and ``linear.ci95``). With several seeds a cell shows
the mean ± the sample standard deviation over the seeds (ddof 1), and its interval is the mean of the
seeds' lower bounds and the mean of their upper bounds: the test-set sampling error of one seed, not the
seed-to-seed spread (that is the ±). A file without intervals gives a bare ``30.6``, as it always did.

The marks, per table column (one arch and one metric):

- best: the entry with the highest mean is marked (markdown ``**...**``, LaTeX ``\\textbf{}``) only when
  its interval's lower bound lies above the upper bound of every other competing entry's interval. The
  reference rows ``random`` and ``supervised`` do not compete. Nothing is marked when any competing entry
  has no interval, or when fewer than two compete. Disjoint 95% intervals are a conservative test (two of
  equal width that just touch differ at about p = 0.006), so no mark means "not shown to differ", never
  "equal".
- ``≈``: an entry whose interval overlaps the interval of the ``random`` row (the untrained backbone of
  the same arch) in that column: at this scale the numbers cannot tell it from no training.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

DEFAULT_KNN_K = 20
MISSING = "–"
FAILED = "failed"
NOT_APPLICABLE = "not applicable"  # a method that does not train the arch's family (the reason is kept)
METRICS = ["linear", "k-NN"]
LOW_SHOT = "low_shot:"  # flat column prefix: low_shot:<setting>:<field>
BASELINE_ROW = "random"  # the untrained backbone: what "learned nothing" scores
REFERENCE_ROWS = ("random", "supervised")  # shown for scale, never competing for the best mark
NEAR_BASELINE = "≈"
NEAR_BASELINE_NOTE = (
    "≈: within the 95% interval of the untrained backbone (random); the quick scale cannot tell this row "
    "from no training"
)
INTERVAL_NOTE = "Cells: top-1 % [95% bootstrap interval over the test images]."
BEST_NOTE = (
    "Bold: the best entry of a column, marked only where its interval's lower bound is above every other "
    "entry's upper bound (random and supervised are references and do not compete); no bold means the "
    "intervals cannot separate the leaders."
)
LOW_SHOT_NOTE = (
    "Low-shot: only the setting's labelled training images (count in the header) form the k-NN bank and "
    "the linear probe's training set; cells and marks as above."
)
Measure = Callable[[pd.Series], tuple[float, float, float]]  # a row -> (top-1, lower bound, upper bound)


def seeds_note(usual_n: int) -> str:
    """The aggregation rule, said once under a table that has several seeds per row."""
    return (
        f"Several seeds: mean ± sample std over {usual_n} seeds ((n=k) where a row has k); the interval is "
        "the mean of the seeds' lower bounds and the mean of their upper bounds (test-set sampling of one "
        "seed; the seed-to-seed spread is the ±)."
    )


@dataclass(frozen=True)
class Estimate:
    """One table cell's numbers: the mean over seeds, their spread and the test-set interval."""

    mean: float
    std: float  # sample std over seeds; NaN for one seed
    n: int
    lo: float  # NaN when no interval was recorded
    hi: float
    values: tuple[float, ...]  # the seeds' own numbers, for the plot's dots

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.lo) or math.isnan(self.hi))


def estimate(measures: Iterable[tuple[float, float, float]]) -> Estimate | None:
    """(value, lo, hi) per seed -> one Estimate; None when no seed has a value.

    The interval is kept only when every seed with a value recorded one: averaging the bounds of some
    seeds would pass off a partial interval as the whole cell's.
    """
    kept = [(v, lo, hi) for v, lo, hi in measures if not math.isnan(v)]
    if not kept:
        return None
    values = tuple(v for v, _, _ in kept)
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    complete = all(not (math.isnan(lo) or math.isnan(hi)) for _, lo, hi in kept)
    lo = math.fsum(lo for _, lo, _ in kept) / n if complete else math.nan
    hi = math.fsum(hi for _, _, hi in kept) / n if complete else math.nan
    return Estimate(mean=mean, std=std, n=n, lo=lo, hi=hi, values=values)


def format_estimate(value: Estimate, usual_n: int = 1) -> str:
    """``30.6``, ``30.6 [28.5, 32.7]`` or ``30.6 ± 0.4 [28.5, 32.7]``; ``(n=2)`` where n is unusual."""
    text = f"{value.mean:.1f}"
    if value.n > 1:
        text += f" ± {value.std:.1f}"
    if value.has_interval:
        text += f" [{value.lo:.1f}, {value.hi:.1f}]"
    if value.n != usual_n:
        text += f" (n={value.n})"
    return text


def overlaps(a: Estimate, b: Estimate) -> bool:
    """Whether two intervals share any point; False when either has none (nothing can be said)."""
    return a.has_interval and b.has_interval and a.lo <= b.hi and b.lo <= a.hi


def best_separated(column: Mapping[str, Estimate]) -> str | None:
    """The competing entry whose interval lies above every other competitor's, or None."""
    competing = {label: e for label, e in column.items() if label not in REFERENCE_ROWS}
    if len(competing) < 2 or not all(e.has_interval for e in competing.values()):
        return None
    leader = max(competing, key=lambda label: competing[label].mean)
    lower = competing[leader].lo
    return leader if all(lower > e.hi for label, e in competing.items() if label != leader) else None


def near_baseline(column: Mapping[str, Estimate]) -> set[str]:
    """Entries whose interval overlaps the random row's in this column (none without a random row)."""
    baseline = column.get(BASELINE_ROW)
    if baseline is None:
        return set()
    return {label for label, e in column.items() if label != BASELINE_ROW and overlaps(e, baseline)}


# --- rows of the flat results frame (one per row label, arch and seed) ------------------------------------


def number(value: Any) -> float:
    """JSON nulls, missing keys and junk all become NaN so columns stay numeric."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def is_failed(row: pd.Series) -> bool:
    return str(row.get("status")).lower() == FAILED


def is_not_applicable(row: pd.Series) -> bool:
    return str(row.get("status")).lower() == NOT_APPLICABLE


def is_collapsed(row: pd.Series) -> bool:
    value = row.get("collapsed")
    return isinstance(value, bool | np.bool_) and bool(value)


def row_label(row: pd.Series | dict[str, Any]) -> str:
    """``dino``, ``dino [no_centering]`` for an ablation variant, ``dino (weights: FILE)`` for weights
    evaluated from a file (reads a flat row or a raw eval.json alike)."""
    variant = row.get("variant")
    label = f"{row['method']} [{variant}]" if isinstance(variant, str) and variant else str(row["method"])
    weights = row.get("weights")
    source = weights.get("source") if isinstance(weights, dict) else row.get("weights_source")
    return f"{label} (weights: {source})" if isinstance(source, str) and source else label


def headline_k(row: pd.Series) -> int:
    k = number(row.get("knn_k"))
    return DEFAULT_KNN_K if math.isnan(k) else int(k)


def headline_knn(row: pd.Series) -> float:
    """Top-1 % of the k-NN at the headline k the pair recorded (NaN when it has none)."""
    return number(row.get(f"knn_{headline_k(row)}"))


def arch_labels(df: pd.DataFrame) -> dict[str, str]:
    """ViT columns carry the patch size actually used, since a run may shrink it for small images."""
    labels: dict[str, str] = {}
    for arch in df["arch"].drop_duplicates():
        patches = []
        if "patch_size" in df.columns:
            values = map(number, df.loc[df["arch"] == arch, "patch_size"])
            patches = sorted({int(p) for p in values if not math.isnan(p)})
        labels[arch] = f"{arch} (patch {'/'.join(map(str, patches))})" if patches else str(arch)
    return labels


def pair_groups(df: pd.DataFrame) -> dict[tuple[str, str], list[pd.Series]]:
    """The seeds of each (row label, arch), in first-appearance order: one table cell each."""
    groups: dict[tuple[str, str], list[pd.Series]] = {}
    for _, row in df.iterrows():
        groups.setdefault((row_label(row), str(row["arch"])), []).append(row)
    return groups


def usual_n(df: pd.DataFrame) -> int:
    """Seeds per row in this report (the most any row has); a cell with fewer says its own n."""
    return max((len(rows) for rows in pair_groups(df).values()), default=1)


def measure(prefix: str, value: str, bounds: str) -> Measure:
    """Reads (top-1, lo, hi) from ``<prefix><value>`` and ``<prefix><bounds>_lo/_hi``; ``{k}`` in a
    name is the row's headline k."""

    def read(row: pd.Series) -> tuple[float, float, float]:
        name, ci = (prefix + pattern.format(k=headline_k(row)) for pattern in (value, bounds))
        return number(row.get(name)), number(row.get(f"{ci}_lo")), number(row.get(f"{ci}_hi"))

    return read


MEASURES: dict[str, Measure] = {"linear": measure("", "linear_top1", "linear"),
                                "k-NN": measure("", "knn_{k}", "knn_{k}")}  # fmt: skip


# --- the tables of cells -----------------------------------------------------------------------------------


def _collapse_suffix(ok: list[pd.Series]) -> str:
    shrunk = sum(is_collapsed(row) for row in ok)
    if not shrunk:
        return ""
    return " (collapsed)" if shrunk == len(ok) else f" (collapsed in {shrunk} of {len(ok)} seeds)"


def column_cells(df: pd.DataFrame, arch: str, read: Measure) -> tuple[dict[str, str], set[str]]:
    """One column's cells by row label, marks applied, and the labels whose cell holds a number."""
    texts: dict[str, str] = {}
    suffixes: dict[str, str] = {}  # labels with a seed that ran: what follows their number
    estimates: dict[str, Estimate] = {}
    for (label, row_arch), rows in pair_groups(df).items():
        if row_arch != str(arch):
            continue
        ok = [row for row in rows if not is_failed(row) and not is_not_applicable(row)]
        if not ok:
            texts[label] = FAILED if any(is_failed(row) for row in rows) else "n/a"
            continue
        suffixes[label] = _collapse_suffix(ok)
        found = estimate(read(row) for row in ok)
        if found is not None:
            estimates[label] = found
    best, near, n = best_separated(estimates), near_baseline(estimates), usual_n(df)
    for label, suffix in suffixes.items():
        text = (format_estimate(estimates[label], n) if label in estimates else MISSING) + suffix
        text += f" {NEAR_BASELINE}" if label in near else ""
        texts[label] = f"**{text}**" if label == best else text
    return texts, set(estimates)


def _grid(
    columns: dict[tuple[str, ...], dict[str, str]], labels: list[str], names: list[str]
) -> pd.DataFrame:
    table = pd.DataFrame(MISSING, index=pd.Index(labels, name="method"), dtype=object,
                         columns=pd.MultiIndex.from_tuples(list(columns), names=names))  # fmt: skip
    for column, texts in columns.items():
        for label, text in texts.items():
            if label in table.index:
                table.loc[label, column] = text
    return table


def comparison_table(df: pd.DataFrame) -> pd.DataFrame:
    """Methods x (arch, metric) of formatted top-1 %, laid out like Table 2 of the DINO paper; failed,
    not applicable and collapsed cells say so, and the best is bold (markdown) where it is separated."""
    columns = {(arch_label, metric): column_cells(df, arch, MEASURES[metric])[0]
               for arch, arch_label in arch_labels(df).items() for metric in METRICS}  # fmt: skip
    labels = list(dict.fromkeys(label for label, _ in pair_groups(df)))
    return _grid(columns, labels, ["arch", "metric"])


def low_shot_settings(df: pd.DataFrame) -> list[str]:
    found = [str(c)[len(LOW_SHOT) :].rpartition(":")[0] for c in df.columns if str(c).startswith(LOW_SHOT)]
    return list(dict.fromkeys(found))


def low_shot_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """Methods x (arch, setting, metric) of the low-shot results, cells and marks as in the comparison
    table; None when no row has any. Columns and rows without a number are left out."""
    columns: dict[tuple[str, ...], dict[str, str]] = {}
    numbered: set[str] = set()
    for arch, arch_label in arch_labels(df).items():
        for setting in low_shot_settings(df):
            prefix = f"{LOW_SHOT}{setting}:"
            images = {int(v) for v in map(number, df.get(f"{prefix}bank_images", [])) if not math.isnan(v)}
            shown = f"{setting} ({images.pop()} images)" if len(images) == 1 else setting
            for metric, value in (("linear", "linear_top1"), ("k-NN", "knn_{k}")):
                texts, with_number = column_cells(
                    df, arch, measure(prefix, value, value.replace("_top1", ""))
                )
                if with_number:
                    columns[(arch_label, shown, metric)] = texts
                    numbered |= with_number
    if not columns:
        return None
    labels = [label for label in dict.fromkeys(label for label, _ in pair_groups(df)) if label in numbered]
    return _grid(columns, labels, ["arch", "setting", "metric"])


def cell_notes(df: pd.DataFrame, tables: Iterable[pd.DataFrame | None]) -> list[str]:
    """The lines that say what an interval, a ± and a mark mean; none for files without intervals."""
    bounds = [c for c in df.columns if str(c).endswith(("_lo", "_hi"))]
    notes = []
    if bounds and df[bounds].notna().to_numpy().any():
        notes += [INTERVAL_NOTE, BEST_NOTE]
    if usual_n(df) > 1:
        notes.append(seeds_note(usual_n(df)))
    cells = [str(v) for table in tables if table is not None for v in table.to_numpy().ravel()]
    if any(NEAR_BASELINE in cell for cell in cells):
        notes.append(NEAR_BASELINE_NOTE)
    return notes


# Laid out like the DINO paper's Table 2, so say once what its linear column is (or is not).
LINEAR_NOTE = (
    "Linear: sslbench's fast probe (SGD on cached, standardised frozen features with a short lr sweep), "
    "not the reference's eval_linear.py (augmented images, 100 epochs); not comparable with the paper's "
    "linear column."
)


def _paper_protocol(rows: pd.DataFrame) -> str:
    """The paper protocol with the epochs its rows recorded (each row's full line is under Protocol)."""
    lines = [str(v) for v in rows.get("linear_protocol", pd.Series(dtype=object)) if isinstance(v, str)]
    epochs = dict.fromkeys(m for line in lines for m in re.findall(r"(\d+)\s*epochs?\b", line))
    trained = f"{'/'.join(epochs)} epochs" if epochs else "epochs not recorded"
    return (
        f"the DINO paper's linear protocol (the reference's eval_linear.py: augmented images, {trained}; "
        "linear_protocol under Protocol)"
    )


def linear_note(df: pd.DataFrame) -> str:
    """What the linear column is, from each row's ``linear_kind``: the paper's protocol, sslbench's fast
    probe (also where none was recorded), or which rows use which."""
    measured = df[df["linear_top1"].notna()] if "linear_top1" in df else df.iloc[0:0]
    is_paper = [str(row.get("linear_kind")) == "paper" for _, row in measured.iterrows()]
    paper, probe = measured[is_paper], measured[[not p for p in is_paper]]
    if paper.empty:
        return LINEAR_NOTE
    if probe.empty:
        return f"Linear: {_paper_protocol(paper)}."

    def names(rows: pd.DataFrame) -> str:
        return ", ".join(dict.fromkeys(f"{row_label(r)}/{r['arch']}" for _, r in rows.iterrows()))

    return (
        f"Linear: two protocols, so linear numbers compare only within each: {_paper_protocol(paper)} for "
        f"{names(paper)}; sslbench's fast probe (SGD on cached, standardised frozen features with a short lr "
        f"sweep; not comparable with the paper's linear column) for {names(probe)}."
    )
