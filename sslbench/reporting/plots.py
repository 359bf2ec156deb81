"""Training curves and collapse diagnostics drawn from a run's ``metrics.jsonl`` files.

Final accuracies say which method won; these plots say why one lost: a diverging loss, a wrong lr
schedule, a teacher that stops leading its student, or embeddings that collapsed to a point. They read
only the run folder, so they can be redrawn after training without a GPU.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from sslbench.base.atomic_io import atomic_path
from sslbench.base.collapse_criteria import COLLAPSE_STD_RATIO
from sslbench.reporting.tables import row_label

BASE_COLUMNS = ["pair", "label", "kind"]
DIAGNOSTICS = ["embedding_std", "effective_rank", "teacher_entropy", "teacher_student_kl"]
_DPI = 120
_MAX_LISTED_BAD_LINES = 5


def _pair_label(folder: Path) -> str:
    """The report's row label and the arch ('dino [no_centering]/vit_tiny16'), as in the tables and
    summary.png; the folder name for a pair that died before writing eval.json."""
    try:
        ev = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
        seed = f" seed {ev['seed']}" if re.search(r"-seed\d+$", folder.name) else ""  # one of --seeds
        return f"{row_label(ev)}/{ev['arch']}{seed}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return folder.name


def _read_records(path: Path) -> list[dict[str, Any]]:
    """JSON objects of one metrics.jsonl; a crash can leave a torn last line, which must not hide the rest."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        warnings.warn(f"skipping unreadable '{path}': {exc}", stacklevel=3)
        return []
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            records.append(obj)
        else:
            bad.append(number)
    if bad:
        more = ", ..." if len(bad) > _MAX_LISTED_BAD_LINES else ""
        shown = ", ".join(map(str, bad[:_MAX_LISTED_BAD_LINES])) + more
        warnings.warn(f"skipping {len(bad)} unreadable line(s) of '{path}' (line {shown})", stacklevel=3)
    return records


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    """All metrics lines of all pair folders with ``pair``, ``label`` and ``kind`` columns first.

    Lines without a ``kind`` are ``train`` lines (older runs). Columns whose values are all numbers are
    numeric. A missing or empty run folder gives an empty frame with just the base columns.
    """
    run_path = Path(run_dir)
    folders = sorted(p for p in run_path.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if run_path.is_dir() else []  # fmt: skip
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for folder in folders:
        path = folder / "metrics.jsonl"
        records = _read_records(path) if path.is_file() else []
        if not records:
            continue
        label = _pair_label(folder)
        if label in seen:  # Two folders claiming the same pair must still get lines of their own.
            label = f"{label} ({folder.name})"
        seen.add(label)
        for record in records:
            rows.append(
                {**record, "pair": folder.name, "label": label, "kind": str(record.get("kind") or "train")}
            )
    if not rows:
        return pd.DataFrame(columns=BASE_COLUMNS)
    df = pd.DataFrame(rows)
    metrics = [c for c in df.columns if c not in BASE_COLUMNS]
    for column in metrics:
        try:
            numeric = pd.to_numeric(df[column], errors="coerce")
        except (TypeError, ValueError):
            continue
        if numeric.notna().sum() == df[column].notna().sum():
            df[column] = numeric
    return df[BASE_COLUMNS + metrics]


def _train_lines(df: pd.DataFrame) -> pd.DataFrame:
    """Train lines with an ``iteration`` x axis; very old runs without one get their line number."""
    train = df[df["kind"] == "train"].copy()
    if "iteration" not in train.columns:
        train["iteration"] = train.groupby("pair").cumcount()
    return train


def _palette(labels: Sequence[str]) -> dict[str, Any]:
    """One colour per label, the same in every panel (tab10 like summary.png; husl once it would repeat)."""
    import seaborn as sns

    colors = sns.color_palette("tab10" if len(labels) <= 10 else "husl", max(1, len(labels)))
    return dict(zip(labels, colors, strict=False))


def _figure(n_panels: int, ncols: int) -> tuple[Any, list[Any]]:
    """A constrained-layout figure on its own Agg canvas, so no display or global backend is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(4.8 * ncols, 3.6 * nrows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        fig.delaxes(ax)
    return fig, axes[:n_panels]


def _draw(ax: Any, data: pd.DataFrame, x: str, y: str, colors: dict[str, Any], **style: Any) -> bool:
    """One line per label of ``y`` against ``x``; returns whether anything was there to draw."""
    if x not in data.columns or y not in data.columns:
        return False
    drawn = False
    for label, part in data.groupby("label", sort=False):
        points = part[[x, y]].apply(pd.to_numeric, errors="coerce").replace([math.inf, -math.inf], math.nan)
        points = points.dropna().sort_values(x, kind="stable")
        if points.empty:
            continue
        marker = style.get("marker") or ("o" if len(points) == 1 else None)  # A lone point needs a marker.
        ax.plot(points[x], points[y], color=colors[label], **{**style, "marker": marker})
        drawn = True
    return drawn


def _decorate(ax: Any, title: str, xlabel: str, ylabel: str, drawn: bool, missing: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, missing, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _run_name(run_dir: str | Path) -> str:
    return Path(run_dir).resolve().name


def _finish(fig: Any, colors: dict[str, Any], extra: list[Any], title: str, path: Path) -> Path:
    """Shared legend under the panels (it never hides a curve), title, atomic PNG write."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, label=label) for label, c in colors.items()] + extra
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), fontsize=9)
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight")
    return path


def write_training_curves(run_dir: str | Path, out_dir: str | Path | None = None) -> Path | None:
    """curves.png: loss and lr vs iteration, k-NN top-1 vs epoch (teacher solid, student dashed).

    Returns None and writes nothing when the run has no train lines.
    """
    from matplotlib.lines import Line2D

    df = load_metrics(run_dir)
    train = _train_lines(df)
    if train.empty:
        return None
    monitor = df[df["kind"] == "monitor"]
    colors = _palette(list(df["label"].drop_duplicates()))
    fig, (ax_loss, ax_lr, ax_knn) = _figure(3, 3)
    drawn = _draw(ax_loss, train, "iteration", "loss", colors, lw=1.2)
    _decorate(ax_loss, "Training loss", "iteration", "loss", drawn, "no loss recorded")
    drawn = _draw(ax_lr, train, "iteration", "lr", colors, lw=1.2)
    _decorate(ax_lr, "Learning rate schedule", "iteration", "learning rate", drawn, "no lr recorded")
    knn_style = {"marker": "o", "ms": 4, "lw": 1.4}
    teacher = _draw(ax_knn, monitor, "epoch", "knn_teacher", colors, ls="-", **knn_style)
    student = _draw(ax_knn, monitor, "epoch", "knn_student", colors, ls="--", mfc="white", **knn_style)
    _decorate(ax_knn, "k-NN top-1 during training", "epoch", "top-1 (%)", teacher or student,
              "no k-NN monitor lines")  # fmt: skip
    extra = []
    if teacher:
        extra.append(Line2D([], [], color="0.3", ls="-", marker="o", ms=4, label="teacher (k-NN)"))
    if student:
        style = {"color": "0.3", "marker": "o", "ms": 4, "mfc": "white"}
        extra.append(Line2D([], [], ls="--", label="student (k-NN)", **style))
    out = Path(out_dir if out_dir is not None else run_dir) / "curves.png"
    return _finish(fig, colors, extra, f"sslbench: training curves ({_run_name(run_dir)})", out)


def _collapse_threshold(threshold: float | None) -> float:
    """The documented threshold from sslbench.base.collapse_criteria, so plot and check never disagree."""
    return float(COLLAPSE_STD_RATIO if threshold is None else threshold)


def write_collapse_diagnostics(
    run_dir: str | Path, out_dir: str | Path | None = None, *, threshold: float | None = None
) -> Path | None:
    """collapse.png: embedding spread (std / healthy std) with the collapse threshold, effective rank, and
    where present teacher entropy and teacher-student KL (the DINO paper's collapse study).

    ``threshold`` overrides ``sslbench.base.collapse_criteria.COLLAPSE_STD_RATIO``. Returns None and
    writes nothing when no train line carries a diagnostic.
    """
    from matplotlib.lines import Line2D

    train = _train_lines(load_metrics(run_dir))
    present = [c for c in DIAGNOSTICS if c in train.columns and train[c].notna().any()]
    if not present:
        return None
    limit = _collapse_threshold(threshold)
    if {"embedding_std", "embedding_std_healthy"} <= set(train.columns):
        std = pd.to_numeric(train["embedding_std"], errors="coerce")
        healthy = pd.to_numeric(train["embedding_std_healthy"], errors="coerce")
        train["std_ratio"] = (std / healthy.where(healthy > 0)).replace([math.inf, -math.inf], math.nan)
    panels = [
        ("std_ratio", "Embedding spread", "std / healthy std (1/√d)", "no embedding_std / healthy std"),
        ("effective_rank", "Effective rank (RankMe)", "effective rank", "no effective_rank recorded"),
    ]
    if "teacher_entropy" in present:
        panels.append(("teacher_entropy", "Teacher entropy", "entropy (nats)", ""))
    if "teacher_student_kl" in present:
        panels.append(("teacher_student_kl", "Teacher-student KL", "KL (nats)", ""))
    fig, axes = _figure(len(panels), len(panels) if len(panels) <= 3 else 2)
    colors = _palette(list(train["label"].drop_duplicates()))
    for ax, (column, title, ylabel, missing) in zip(axes, panels, strict=True):
        drawn = _draw(ax, train, "iteration", column, colors, lw=1.2)
        _decorate(ax, title, "iteration", ylabel, drawn, missing)
    ax_std = axes[0]
    ax_std.axhline(1.0, ls="--", lw=1.0, color="0.6")
    ax_std.axhline(limit, ls=":", lw=1.5, color="0.15")
    top = train["std_ratio"].max() if "std_ratio" in train.columns else math.nan
    ax_std.set_ylim(0.0, max(1.1, float(top) * 1.05) if not math.isnan(top) else 1.1)
    extra = [
        Line2D([], [], ls="--", lw=1.0, color="0.6", label="healthy spread (1.0)"),
        Line2D([], [], ls=":", lw=1.5, color="0.15", label=f"collapse threshold ({limit:g})"),
    ]
    out = Path(out_dir if out_dir is not None else run_dir) / "collapse.png"
    return _finish(fig, colors, extra, f"sslbench: collapse diagnostics ({_run_name(run_dir)})", out)
