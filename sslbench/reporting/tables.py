"""Turn finished run folders into the comparison table, protocol notes and plot.

The report reads only ``results/<run>/<pair>/eval.json`` files (``<method>-<arch>``, or
``<method>-<arch>-seed<N>`` for one seed of several), so it can be rerun (or run on several runs merged)
without touching a GPU. Every number it prints travels with the protocol that produced it and, where
the evaluation recorded one, its 95% interval: a table without them is how unfair comparisons and
differences smaller than the test set can tell get published. How seeds are aggregated and when a cell
is marked best or ``≈`` the untrained backbone is in ``sslbench.reporting.intervals``.

summary.csv holds one row per (row label, arch, seed): the seed, each k-NN top-1 with its interval
(``knn_<k>``, ``knn_<k>_lo``, ``knn_<k>_hi``), the linear top-1 with its interval (``linear_top1``,
``linear_lo``, ``linear_hi``), foreign weights (``weights_*``), low-shot results
(``low_shot:<setting>:<field>``), diagnostics and every protocol field.
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
import yaml

from sslbench.base.atomic_io import atomic_path, make_folder, write_text_atomic
from sslbench.base.collapse_criteria import DIAGNOSTIC_KEYS
from sslbench.base.errors import SSLBenchError
from sslbench.reporting.intervals import (
    LINEAR_NOTE,
    LOW_SHOT,
    LOW_SHOT_NOTE,
    NOT_APPLICABLE,
    cell_notes,
    comparison_table,
    headline_knn,
    is_collapsed,
    is_failed,
    linear_note,
    low_shot_table,
    number,
    pair_groups,
    row_label,
    usual_n,
)
from sslbench.reporting.summary_plot import summary_plot_data, write_summary_plot

# What other modules import from here (the cells themselves are built in intervals.py).
__all__ = [
    "BASE_COLUMNS", "KEY_PROTOCOL", "LINEAR_NOTE", "comparison_table", "format_table_text", "headline_knn",
    "linear_note", "load_results", "low_shot_table", "protocol_summary", "row_label", "write_report",
]  # fmt: skip
KNN_KS = ("10", "20", "100", "200")
BASE_COLUMNS = [
    "run", "method", "variant", "arch", "seed", "status", "error", "method_source", "collapsed",
    "collapse_reasons", *[f"knn_{k}{part}" for k in KNN_KS for part in ("", "_lo", "_hi")],
    "linear_top1", "linear_lo", "linear_hi", "linear_best_lr", "train_wall_s", "train_images_per_s",
    "final_loss",
]  # fmt: skip
# Shown first and always, because these are the knobs that most change the numbers.
KEY_PROTOCOL = [
    "knn_k", "knn_temperature", "feature_source", "crops", "epochs", "batch_size", "precision", "dataset",
    "seed",
]  # fmt: skip
_RESULT_COLUMN = re.compile(r"^(knn_\d+(_lo|_hi)?|weights_.*|low_shot:.*)$")
_Key = tuple[str, str, Any]  # (row label, arch, seed or None): one row of summary.csv
_SEED_FOLDER = re.compile(r"^(?P<pair>.+)-seed(?P<seed>\d+)$")
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--",
    "±": r"$\pm$", "≈": r"$\approx$",
}  # fmt: skip


def _bounds(pair: Any) -> tuple[float, float]:
    """A recorded ``[lo, hi]``; NaNs for anything else (older files have none)."""
    if isinstance(pair, list | tuple) and len(pair) == 2:
        return number(pair[0]), number(pair[1])
    return math.nan, math.nan


def _split_folder(name: str) -> tuple[str, str, int | None]:
    """``dino-vit_s16-seed1`` -> ('dino', 'vit_s16', 1); a folder without a seed gives None."""
    match = _SEED_FOLDER.match(name)
    method, _, arch = (match["pair"] if match else name).rpartition("-")
    return method, arch, int(match["seed"]) if match else None


def _low_shot_fields(setting: str, entry: dict[str, Any]) -> dict[str, float]:
    prefix = f"{LOW_SHOT}{setting}:"
    fields = {f"{prefix}bank_images": number(entry.get("bank_images"))}
    knn_ci = entry.get("knn_ci95") or {}
    for k, value in (entry.get("knn") or {}).items():
        lo, hi = _bounds(knn_ci.get(k))
        fields |= {f"{prefix}knn_{k}": number(value), f"{prefix}knn_{k}_lo": lo, f"{prefix}knn_{k}_hi": hi}
    linear = entry.get("linear") or {}
    lo, hi = _bounds(linear.get("ci95"))
    fields |= {f"{prefix}linear_top1": number(linear.get("top1")), f"{prefix}linear_lo": lo,
               f"{prefix}linear_hi": hi,
               f"{prefix}linear_best_lr": number(linear.get("best_lr"))}  # fmt: skip
    return fields


def _flatten(run: str, folder: Path, ev: dict[str, Any]) -> dict[str, Any]:
    """One eval.json -> one flat row; the folder name backs up a missing method/arch/seed."""
    fallback_method, fallback_arch, folder_seed = _split_folder(folder.name)
    knn, knn_ci = ev.get("knn") or {}, ev.get("knn_ci95") or {}
    linear, train = ev.get("linear") or {}, ev.get("train") or {}
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
        "linear_top1": number(linear.get("top1")),
        "linear_best_lr": number(linear.get("best_lr")),
        "train_wall_s": number(train.get("wall_s")),
        "train_images_per_s": number(train.get("images_per_s")),
        "final_loss": number(train.get("final_loss")),
    }
    if ev.get("seed") is not None:
        row["seed"] = ev["seed"]
    row["linear_lo"], row["linear_hi"] = _bounds(linear.get("ci95"))
    for k in (*KNN_KS, *knn):
        row[f"knn_{k}"] = number(knn.get(k))
        row[f"knn_{k}_lo"], row[f"knn_{k}_hi"] = _bounds(knn_ci.get(k))
    weights = ev.get("weights")
    for key, value in weights.items() if isinstance(weights, dict) else ():
        row[f"weights_{key}"] = value
    for setting, entry in (ev.get("low_shot") or {}).items():
        if isinstance(entry, dict):
            row |= _low_shot_fields(str(setting), entry)
    for key, value in (ev.get("collapse") or {}).items():
        if key not in ("collapsed", "reasons", "advice"):
            row.setdefault(key, number(value))
    for key, value in (ev.get("protocol") or {}).items():
        row.setdefault(key, value)
    row.setdefault("seed", math.nan if folder_seed is None else folder_seed)
    return row


# What sslbench writes beside the pairs of a run: attention maps, exports, tracker files.
RUN_SIDE_FOLDERS = frozenset({"attention", "export", "trackers", "jobs"})


def _pair_folders(run_path: Path) -> list[Path]:
    """Pair folders in the run's own method x arch order (from its config.yaml), seeds in number order,
    others after by name."""
    order: list[str] = []
    config_path = run_path / "config.yaml"
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
            order = [f"{m}-{a}" for m in config.get("methods", []) for a in config.get("archs", [])]
        except (yaml.YAMLError, AttributeError, TypeError):
            order = []

    def position(folder: Path) -> tuple[int, str, int, str]:
        method, arch, seed = _split_folder(folder.name)
        pair = folder.name if seed is None else f"{method}-{arch}"
        return (order.index(pair) if pair in order else len(order), pair, -1 if seed is None else seed,
                folder.name)  # fmt: skip

    folders = (p for p in run_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted((p for p in folders if p.name not in RUN_SIDE_FOLDERS), key=position)


def _read_eval(folder: Path) -> dict[str, Any] | None:
    """A pair's eval.json, or None with a warning: one unreadable pair must not hide the others."""
    eval_path = folder / "eval.json"
    if not eval_path.is_file():
        warnings.warn(f"skipping incomplete result folder '{folder}' (no eval.json)", stacklevel=3)
        return None
    try:
        ev = json.loads(eval_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        warnings.warn(f"skipping unreadable '{eval_path}': {exc}", stacklevel=3)
        return None
    if not isinstance(ev, dict):
        warnings.warn(f"skipping '{eval_path}': expected a JSON object", stacklevel=3)
        return None
    return ev


def _keep(rows: dict[_Key, dict[str, Any]], key: _Key, row: dict[str, Any]) -> dict[_Key, dict[str, Any]]:
    """Add a row, replacing (with a warning) the rows it cannot be told from: the same (label, arch,
    seed), or any of its (label, arch) where one side has no seed (a file older than the seed field)."""
    clash = [k for k in rows if k[:2] == key[:2] and (k[2] == key[2] or k[2] is None or key[2] is None)]
    for old in clash:
        which = f"{old[0]}/{old[1]}" + ("" if old[2] is None else f" seed {old[2]}")
        warnings.warn(f"{which} from run '{rows[old]['run']}' is replaced by run '{row['run']}'",
                      stacklevel=3)  # fmt: skip
    if not clash:
        return rows | {key: row}
    # The replacement takes the first position, so the method order stays stable.
    return {(key if k == clash[0] else k): (row if k == clash[0] else v) for k, v in rows.items()
            if k not in clash[1:]}  # fmt: skip


def load_results(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One flat row per (row label, arch, seed) across run folders; a later folder's row replaces an
    earlier one of the same key. The seed key is eval.json's top-level ``seed`` (or the folder's
    ``-seed<N>``): files older than that field keep one row per (label, arch), as a rerun replaced them."""
    rows: dict[_Key, dict[str, Any]] = {}
    searched: list[str] = []
    for run_dir in run_dirs:
        run_path = Path(run_dir)
        if not run_path.is_dir():
            problem = "is not a folder" if run_path.exists() else "does not exist"
            raise SSLBenchError(f"run folder '{run_path}' {problem} (expected results/<run>/)")
        searched.append(str(run_path))
        for folder in _pair_folders(run_path):
            ev = _read_eval(folder)
            if ev is None:
                continue
            row = _flatten(run_path.name, folder, ev)
            seed = ev.get("seed", _split_folder(folder.name)[2])
            rows = _keep(rows, (row_label(row), row["arch"], seed), row)
    if not rows:
        raise SSLBenchError(f"no eval.json found in any <method>-<arch>/ folder under: {', '.join(searched)}")
    df = pd.DataFrame(list(rows.values()))
    extra = [c for c in df.columns if c not in BASE_COLUMNS]
    return df[BASE_COLUMNS + extra]


def _protocol_keys(df: pd.DataFrame) -> list[str]:
    """Protocol columns are whatever is not a result column (keeps working after a CSV round trip)."""
    results = {*BASE_COLUMNS, *DIAGNOSTIC_KEYS}
    return [c for c in df.columns if c not in results and not _RESULT_COLUMN.match(str(c))]


def _fmt_value(value: Any) -> str:
    """Print 2.0 as 2 and NaN as n/a so equal settings compare equal as text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _seeds_line(recorded: pd.DataFrame) -> str | None:
    """``seeds: 0, 1, 2 (mean ± std over 3)`` when any row aggregates several seeds, else None."""
    counts = [len(rows) for rows in pair_groups(recorded).values()]
    if max(counts, default=1) < 2:
        return None
    seeds = sorted({number(s) for s in recorded["seed"] if not math.isnan(number(s))})
    over = str(counts[0]) if len(set(counts)) == 1 else f"{min(counts)}-{max(counts)} per row"
    shown = ", ".join(_fmt_value(s) for s in seeds) or "not recorded"
    return f"seeds: {shown} (mean ± std over {over})"


def _varies(recorded: pd.DataFrame, key: str) -> str:
    """``key: varies (dino/vit_s16=4, ...)``, one entry per row, per seed only where seeds differ."""
    entries: dict[str, list[tuple[str, str]]] = {}
    for _, row in recorded.iterrows():
        entries.setdefault(f"{row_label(row)}/{row['arch']}", []).append(
            (_fmt_value(row.get("seed")), _fmt_value(row[key])))  # fmt: skip
    parts = []
    for name, seeded in entries.items():
        if len({value for _, value in seeded}) == 1:
            parts.append(f"{name}={seeded[0][1]}")
        else:
            parts += [f"{name} seed {seed}={value}" for seed, value in seeded]
    return f"{key}: varies ({', '.join(parts)})"


def protocol_summary(df: pd.DataFrame) -> list[str]:
    """'key: value' for shared settings and 'key: varies (...)' where pairs were run differently; the
    seeds line where rows aggregate several seeds."""
    keys = _protocol_keys(df)
    applies = ~df["status"].astype(str).str.lower().eq(NOT_APPLICABLE) if "status" in df else True
    recorded = df[df[keys].notna().any(axis=1) & applies] if keys else df.iloc[0:0]
    seeds = _seeds_line(df[applies] if "status" in df else df) if "seed" in df else None
    lines: list[str] = []
    for key in KEY_PROTOCOL + [k for k in keys if k not in KEY_PROTOCOL]:
        if key == "seed" and seeds:
            lines.append(seeds)
        elif key not in recorded.columns or recorded.empty or recorded[key].isna().all():
            lines.append(f"{key}: not recorded")
        elif len(values := {_fmt_value(v) for v in recorded[key]}) == 1:
            lines.append(f"{key}: {values.pop()}")
        else:
            lines.append(_varies(recorded, key))
    return lines


def _seed_tag(df: pd.DataFrame, row: pd.Series) -> str:
    return f" seed {_fmt_value(row.get('seed'))}" if usual_n(df) > 1 else ""


def _failures(df: pd.DataFrame) -> list[str]:
    lines = []
    for _, row in df[[is_failed(row) for _, row in df.iterrows()]].iterrows():
        reason = _fmt_value(row["error"])
        reason = "no reason recorded" if reason == "n/a" else reason
        lines.append(f"{row['method']}/{row['arch']}{_seed_tag(df, row)} (run {row['run']}): {reason}")
    return lines


def _markdown(table: pd.DataFrame) -> str:
    """Markdown with one header row per column: ``arch / metric`` (``arch / setting / metric``)."""
    flat = table.copy()
    flat.columns = [" / ".join(map(str, column)) for column in table.columns]
    align = ("left", *["right"] * len(flat.columns))
    return flat.to_markdown(tablefmt="github", disable_numparse=True, colalign=align)


def _weights_lines(df: pd.DataFrame) -> list[str]:
    """Where evaluated weights came from, for rows that did not train here."""
    if "weights_source" not in df:
        return []
    lines = []
    for _, row in df[df["weights_source"].notna()].drop_duplicates("weights_source").iterrows():
        parts = [_fmt_value(row.get(f"weights_{k}")) for k in ("format", "part") if f"weights_{k}" in row]
        if str(row.get("weights_partial")).lower() == "true":  # a bool, or its text after a CSV round trip
            parts.append("partial: not every backbone parameter came from the file")
        lines.append(f"{row_label(row)}/{row['arch']}: {', '.join(p for p in parts if p != 'n/a')}")
    return lines


def format_table_text(df: pd.DataFrame) -> str:
    """Tables, notes, protocol and failures together: what the CLI prints when a run ends."""
    table, low_shot = comparison_table(df), low_shot_table(df)
    parts = [_markdown(table)]
    notes = cell_notes(df, [table, low_shot])
    parts += ["", *notes] if notes else []
    parts += ["", linear_note(df)]
    if low_shot is not None:
        parts += ["", LOW_SHOT_NOTE, "", _markdown(low_shot)]
    parts += ["", "Protocol:", *[f"- {line}" for line in protocol_summary(df)]]
    weights = _weights_lines(df)
    parts += ["", "Weights evaluated from files:", *[f"- {line}" for line in weights]] if weights else []
    failures = _failures(df)
    if failures:
        parts += ["", "Failed pairs:", *[f"- {line}" for line in failures]]
    collapsed = [r for _, r in df.iterrows() if is_collapsed(r)]
    if collapsed:
        parts += ["", "Collapsed pairs (embeddings or outputs no longer depend on the image):"]
        parts += [f"- {row_label(r)}/{r['arch']}{_seed_tag(df, r)}: {r['collapse_reasons']}"
                  for r in collapsed]  # fmt: skip
    if len(failures) == len(df):
        parts += ["", "No pair finished successfully, so there is nothing to compare or plot."]
    return "\n".join(parts) + "\n"


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex_cell(text: str) -> str:
    """A markdown cell in LaTeX: escaped, its ``**best**`` mark as ``\\textbf{}``."""
    if len(text) > 4 and text.startswith("**") and text.endswith("**"):
        return f"\\textbf{{{_latex_escape(text[2:-2])}}}"
    return _latex_escape(text)


def _latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """Everything escaped here, by hand, so the bold marks survive as LaTeX."""
    table = table.map(_latex_cell)
    table.index = pd.Index([_latex_escape(str(v)) for v in table.index], name="method")
    table.columns = pd.MultiIndex.from_tuples(
        [tuple(_latex_escape(str(part)) for part in column) for column in table.columns],
        names=table.columns.names,
    )
    return table.to_latex(caption=caption, label=label, escape=False, multicolumn_format="c",
                          column_format="l" + "r" * len(table.columns))  # fmt: skip


def _latex_table(df: pd.DataFrame) -> str:
    table, low_shot = comparison_table(df), low_shot_table(df)
    caption = " ".join(
        ["Top-1 accuracy (\\%) of linear and k-NN evaluation.",
         *(_latex_escape(note.rstrip(".") + ".") for note in cell_notes(df, [table, low_shot])),
         _latex_escape(linear_note(df)),
         "Protocol: " + "; ".join(_latex_escape(line) for line in protocol_summary(df)) + "."]
    )  # fmt: skip
    text = _latex(table, caption, "tab:sslbench")
    if low_shot is not None:
        caption = "Low-shot top-1 accuracy (\\%); cells and marks as in Table~\\ref{tab:sslbench}."
        text += "\n" + _latex(low_shot, caption, "tab:sslbench-low-shot")
    return text


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
    if write_summary_plot(summary_plot_data(df), png_path):
        written.append(png_path)
    else:
        png_path.unlink(missing_ok=True)  # A plot left from an earlier report would contradict this one.
        warnings.warn(f"no successful results to plot; {png_path.name} not written", stacklevel=2)
    return written
