"""Turn finished run folders into the comparison table, protocol notes and plot.

The report reads only ``results/<run>/<method>-<arch>/eval.json`` files, so it can be rerun (or run on
several runs merged) without touching a GPU. Every number it prints travels with the protocol that
produced it: a table without its protocol is how unfair comparisons get published.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from sslbench.base.atomic_io import atomic_path, make_folder, write_text_atomic
from sslbench.base.collapse_criteria import DIAGNOSTIC_KEYS
from sslbench.base.errors import SSLBenchError

DEFAULT_KNN_K = 20
MISSING = "–"
FAILED = "failed"
NOT_APPLICABLE = "not applicable"  # a method that does not train the arch's family (the reason is kept)
METRICS = ["linear", "k-NN"]
BASE_COLUMNS = [
    "run", "method", "variant", "arch", "status", "error", "method_source", "collapsed", "collapse_reasons",
    "knn_10", "knn_20", "knn_100", "knn_200",
    "linear_top1", "linear_best_lr", "train_wall_s", "train_images_per_s", "final_loss",
]  # fmt: skip
# Shown first and always, because these are the knobs that most change the numbers.
KEY_PROTOCOL = [
    "knn_k", "knn_temperature", "feature_source", "crops", "epochs", "batch_size", "precision", "dataset",
    "seed",
]  # fmt: skip
_KNN_COLUMN = re.compile(r"^knn_\d+$")
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--",
}  # fmt: skip


def _num(value: Any) -> float:
    """JSON nulls, missing keys and junk all become NaN so columns stay numeric."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _flatten(run: str, folder: Path, ev: dict[str, Any]) -> dict[str, Any]:
    """One eval.json -> one flat row; the folder name backs up a missing method/arch."""
    fallback_method, _, fallback_arch = folder.name.rpartition("-")
    knn = ev.get("knn") or {}
    linear = ev.get("linear") or {}
    train = ev.get("train") or {}
    row: dict[str, Any] = {
        "run": run,
        "method": ev.get("method") or fallback_method or folder.name,
        "arch": ev.get("arch") or fallback_arch,
        "status": ev.get("status") or "ok",
        "error": ev.get("error"),
        "variant": ev.get("variant"),
        "method_source": ev.get("method_source"),
        "collapsed": bool((ev.get("collapse") or {}).get("collapsed", False)),
        "collapse_reasons": "; ".join((ev.get("collapse") or {}).get("reasons", [])),
        "linear_top1": _num(linear.get("top1")),
        "linear_best_lr": _num(linear.get("best_lr")),
        "train_wall_s": _num(train.get("wall_s")),
        "train_images_per_s": _num(train.get("images_per_s")),
        "final_loss": _num(train.get("final_loss")),
    }
    for k in ("10", "20", "100", "200", *knn):
        row[f"knn_{k}"] = _num(knn.get(k))
    for key, value in (ev.get("collapse") or {}).items():
        if key not in ("collapsed", "reasons", "advice"):
            row.setdefault(key, _num(value))
    for key, value in (ev.get("protocol") or {}).items():
        row.setdefault(key, value)
    return row


def _collapsed(row: pd.Series) -> bool:
    value = row.get("collapsed")
    return isinstance(value, bool | np.bool_) and bool(value)


def row_label(row: pd.Series | dict[str, Any]) -> str:
    """``dino``, or ``dino [no_centering]`` for an ablation variant."""
    variant = row.get("variant")
    return f"{row['method']} [{variant}]" if isinstance(variant, str) and variant else str(row["method"])


def _pair_folders(run_path: Path) -> list[Path]:
    """Pair folders in the run's own method x arch order (from its config.yaml), others after by name."""
    order: list[str] = []
    config_path = run_path / "config.yaml"
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
            order = [f"{m}-{a}" for m in config.get("methods", []) for a in config.get("archs", [])]
        except (yaml.YAMLError, AttributeError, TypeError):
            order = []
    folders = [p for p in run_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(folders, key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))


def load_results(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One flat row per (method, arch) across run folders; later folders override earlier ones."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    searched: list[str] = []
    for run_dir in run_dirs:
        run_path = Path(run_dir)
        if not run_path.is_dir():
            problem = "is not a folder" if run_path.exists() else "does not exist"
            raise SSLBenchError(f"run folder '{run_path}' {problem} (expected results/<run>/)")
        searched.append(str(run_path))
        for folder in _pair_folders(run_path):
            eval_path = folder / "eval.json"
            if not eval_path.is_file():
                warnings.warn(f"skipping incomplete result folder '{folder}' (no eval.json)", stacklevel=2)
                continue
            try:
                ev = json.loads(eval_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                warnings.warn(f"skipping unreadable '{eval_path}': {exc}", stacklevel=2)
                continue
            if not isinstance(ev, dict):
                warnings.warn(f"skipping '{eval_path}': expected a JSON object", stacklevel=2)
                continue
            row = _flatten(run_path.name, folder, ev)
            key = (row_label(row), row["arch"])
            if key in rows:
                warnings.warn(
                    f"{key[0]}/{key[1]} from run '{rows[key]['run']}' is replaced by run '{row['run']}'",
                    stacklevel=2,
                )
            rows[key] = row  # Replacing keeps the first position, so method order stays stable.
    if not rows:
        raise SSLBenchError(f"no eval.json found in any <method>-<arch>/ folder under: {', '.join(searched)}")
    df = pd.DataFrame(list(rows.values()))
    extra = [c for c in df.columns if c not in BASE_COLUMNS]
    return df[BASE_COLUMNS + extra]


def _protocol_keys(df: pd.DataFrame) -> list[str]:
    """Protocol columns are whatever is not a result column (keeps working after a CSV round trip)."""
    return [
        c
        for c in df.columns
        if c not in BASE_COLUMNS and c not in DIAGNOSTIC_KEYS and not _KNN_COLUMN.match(str(c))
    ]


def _headline_k(row: pd.Series) -> int:
    k = _num(row.get("knn_k"))
    return DEFAULT_KNN_K if math.isnan(k) else int(k)


def headline_knn(row: pd.Series) -> float:
    """Top-1 % of the k-NN at the headline k the pair recorded (NaN when it has none)."""
    return _num(row.get(f"knn_{_headline_k(row)}"))


def _failed(row: pd.Series) -> bool:
    return str(row.get("status")).lower() == FAILED


def _arch_labels(df: pd.DataFrame) -> dict[str, str]:
    """ViT columns carry the patch size actually used, since a run may shrink it for small images."""
    labels: dict[str, str] = {}
    for arch in df["arch"].drop_duplicates():
        patches = []
        if "patch_size" in df.columns:
            values = map(_num, df.loc[df["arch"] == arch, "patch_size"])
            patches = sorted({int(p) for p in values if not math.isnan(p)})
        labels[arch] = f"{arch} (patch {'/'.join(map(str, patches))})" if patches else str(arch)
    return labels


def _cell(value: float) -> str:
    return MISSING if math.isnan(value) else f"{value:.1f}"


def comparison_table(df: pd.DataFrame) -> pd.DataFrame:
    """Methods x (arch, metric) of formatted top-1 %, laid out like Table 2 of the DINO paper."""
    labels = _arch_labels(df)
    methods = list(dict.fromkeys(row_label(row) for _, row in df.iterrows()))
    columns = pd.MultiIndex.from_product([list(labels.values()), METRICS], names=["arch", "metric"])
    table = pd.DataFrame(MISSING, index=pd.Index(methods, name="method"), columns=columns, dtype=object)
    for _, row in df.iterrows():
        label = labels[row["arch"]]
        if _failed(row):
            cells = [FAILED, FAILED]
        elif str(row.get("status")).lower() == NOT_APPLICABLE:
            cells = ["n/a", "n/a"]
        else:
            cells = [_cell(_num(row.get("linear_top1"))), _cell(headline_knn(row))]
            if _collapsed(row):
                cells = [f"{cell} (collapsed)" for cell in cells]
        for metric, cell in zip(METRICS, cells, strict=True):
            table.loc[row_label(row), (label, metric)] = cell
    return table


def _fmt_value(value: Any) -> str:
    """Print 2.0 as 2 and NaN as n/a so equal settings compare equal as text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def protocol_summary(df: pd.DataFrame) -> list[str]:
    """'key: value' for shared settings and 'key: varies (...)' where pairs were run differently."""
    keys = _protocol_keys(df)
    applies = df["status"].astype(str).str.lower() != NOT_APPLICABLE if "status" in df else True
    recorded = df[df[keys].notna().any(axis=1) & applies] if keys else df.iloc[0:0]
    lines: list[str] = []
    for key in KEY_PROTOCOL + [k for k in keys if k not in KEY_PROTOCOL]:
        if key not in recorded.columns or recorded.empty:
            lines.append(f"{key}: not recorded")
            continue
        values = [_fmt_value(v) for v in recorded[key]]
        if len(set(values)) == 1:
            lines.append(f"{key}: {values[0]}")
        else:
            labels = [f"{row_label(row)}/{row['arch']}" for _, row in recorded.iterrows()]
            pairs = ", ".join(f"{label}={v}" for label, v in zip(labels, values, strict=True))
            lines.append(f"{key}: varies ({pairs})")
    return lines


def _failures(df: pd.DataFrame) -> list[str]:
    failed = df[[_failed(row) for _, row in df.iterrows()]]
    lines = []
    for r in failed.itertuples():
        reason = _fmt_value(r.error)
        reason = "no reason recorded" if reason == "n/a" else reason
        lines.append(f"{r.method}/{r.arch} (run {r.run}): {reason}")
    return lines


def _markdown(table: pd.DataFrame) -> str:
    """Markdown with one header row per column: ``arch / metric``."""
    flat = table.copy()
    flat.columns = [f"{arch} / {metric}" for arch, metric in table.columns]
    align = ("left", *["right"] * len(flat.columns))
    return flat.to_markdown(tablefmt="github", disable_numparse=True, colalign=align)


# Laid out like the DINO paper's Table 2, so say once what its linear column is not.
LINEAR_NOTE = (
    "Linear: sslbench's fast probe (SGD on cached, standardised frozen features with a short lr sweep), "
    "not the reference's eval_linear.py (augmented images, 100 epochs); not comparable with the paper's "
    "linear column."
)


def format_table_text(df: pd.DataFrame) -> str:
    """Table, protocol and failures together: what the CLI prints when a run ends."""
    parts = [_markdown(comparison_table(df)), "", LINEAR_NOTE, "", "Protocol:"]
    parts += [f"- {line}" for line in protocol_summary(df)]
    failures = _failures(df)
    if failures:
        parts += ["", "Failed pairs:", *[f"- {line}" for line in failures]]
    collapsed = [r for _, r in df.iterrows() if _collapsed(r)]
    if collapsed:
        parts += ["", "Collapsed pairs (embeddings or outputs no longer depend on the image):"]
        parts += [f"- {row_label(r)}/{r['arch']}: {r['collapse_reasons']}" for r in collapsed]
    if len(failures) == len(df):
        parts += ["", "No pair finished successfully, so there is nothing to compare or plot."]
    return "\n".join(parts) + "\n"


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex_table(df: pd.DataFrame) -> str:
    table = comparison_table(df).replace(MISSING, "--")
    caption = (
        "Top-1 accuracy (\\%) of linear and k-NN evaluation. "
        + _latex_escape(LINEAR_NOTE)
        + " Protocol: "
        + "; ".join(_latex_escape(line) for line in protocol_summary(df))
        + "."
    )
    return table.to_latex(
        caption=caption,
        label="tab:sslbench",
        escape=True,
        multicolumn_format="c",
        column_format="l" + "r" * len(table.columns),
    )


def _plot_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Long format of successful pairs only: failed or missing numbers have no bar to draw."""
    labels = _arch_labels(df)
    records = []
    for _, row in df.iterrows():
        if _failed(row):
            continue
        for panel, value in (("k-NN", headline_knn(row)), ("linear", _num(row.get("linear_top1")))):
            if not math.isnan(value):
                records.append({"method": row_label(row), "arch": labels[row["arch"]], "panel": panel,
                                "top1": value})  # fmt: skip
    return pd.DataFrame(records, columns=["method", "arch", "panel", "top1"])


def _write_plot(df: pd.DataFrame, path: Path) -> bool:
    """Two panels (k-NN, linear); drawn on an Agg canvas so no display or global backend is touched."""
    import seaborn as sns
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = _plot_frame(df)
    if data.empty:
        return False
    methods = list(dict.fromkeys(row_label(row) for _, row in df.iterrows()))
    archs = list(_arch_labels(df).values())
    ks = sorted({_headline_k(row) for _, row in df.iterrows()})
    temps = sorted({_fmt_value(t) for t in df["knn_temperature"]}) if "knn_temperature" in df else []
    knn_title = f"k-NN (k={'/'.join(map(str, ks))}" + (f", T={'/'.join(temps)})" if temps else ")")
    fig = Figure(figsize=(max(8.0, 1.6 * len(methods) * 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    handles: list[Any] = []
    names: list[str] = []
    for ax, panel, title in zip(axes, METRICS[::-1], [knn_title, "Linear probe"], strict=True):
        part = data[data["panel"] == panel]
        ax.set_title(title)
        ax.set_xlabel("method")
        ax.set_ylabel("top-1 accuracy (%)")
        if part.empty:
            ax.text(0.5, 0.5, f"no {panel} results", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        sns.barplot(data=part, x="method", y="top1", hue="arch", order=methods, hue_order=archs, ax=ax)
        for container in ax.containers:
            ax.bar_label(container, fmt="%.1f", fontsize=8, padding=2)
        handles, names = ax.get_legend_handles_labels()
        ax.get_legend().remove()
    # One legend under both panels, so it never hides a bar.
    fig.legend(handles, names, title="arch", loc="outside lower center", ncol=max(1, len(archs)))
    axes[0].set_ylim(0, data["top1"].max() * 1.15 + 2)
    failed = [f"{r.method}/{r.arch}" for _, r in df.iterrows() if _failed(r)]
    note = f"\nfailed, not shown: {', '.join(failed)}" if failed else ""
    fig.suptitle(f"sslbench: top-1 accuracy by method and architecture{note}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return True


def write_report(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write summary.csv, table.md, table.tex and (if anything succeeded) summary.png atomically."""
    out = Path(out_dir)
    make_folder(out, "report folder")
    csv_path, md_path, tex_path, png_path = (out / n for n in ("summary.csv", "table.md", "table.tex",
                                                                 "summary.png"))  # fmt: skip
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False)
    runs = ", ".join(str(r) for r in df["run"].drop_duplicates())
    write_text_atomic(md_path, f"# sslbench results ({runs})\n\n{format_table_text(df)}")
    write_text_atomic(tex_path, _latex_table(df))
    written = [csv_path, md_path, tex_path]
    if _write_plot(df, png_path):
        written.append(png_path)
    else:
        png_path.unlink(missing_ok=True)  # A plot left from an earlier report would contradict this one.
        warnings.warn(f"no successful results to plot; {png_path.name} not written", stacklevel=2)
    return written
