"""summary.png: top-1 by method and arch, with the 95% intervals as error bars and each seed as a dot.

A bar is the same Estimate as the table cell of that method, arch and metric (``intervals``), so the
figure and the tables cannot disagree; failed pairs have no bar and are named in the title.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sslbench.base.atomic_io import atomic_path
from sslbench.reporting.intervals import (
    MEASURES,
    Estimate,
    arch_labels,
    estimate,
    headline_k,
    is_failed,
    number,
    pair_groups,
    usual_n,
)

PANELS = ("k-NN", "linear")


@dataclass
class SummaryPlotData:
    """One Estimate per (panel, method, arch), with the orders and titles the tables use."""

    bars: dict[tuple[str, str, str], Estimate]
    methods: list[str]
    archs: list[str]
    knn_title: str = "k-NN"
    failed: list[str] = field(default_factory=list)


def summary_plot_data(df: pd.DataFrame) -> SummaryPlotData:
    """Per panel, method and arch the Estimate of the successful seeds; the k-NN title names k and T."""
    labels = arch_labels(df)
    bars: dict[tuple[str, str, str], Estimate] = {}
    for (label, arch), rows in pair_groups(df).items():
        for panel in PANELS:
            found = estimate(MEASURES[panel](row) for row in rows if not is_failed(row))
            if found is not None:
                bars[(panel, label, labels[arch])] = found
    ks = sorted({headline_k(row) for _, row in df.iterrows()})
    temps = sorted({f"{t:g}" for t in map(number, df.get("knn_temperature", [])) if not math.isnan(t)})
    knn_title = f"k-NN (k={'/'.join(map(str, ks))}" + (f", T={'/'.join(temps)})" if temps else ")")
    seeded = usual_n(df) > 1
    failed = [f"{r['method']}/{r['arch']}" + (f" seed {number(r.get('seed')):g}" if seeded else "")
              for _, r in df.iterrows() if is_failed(r)]  # fmt: skip
    drawn = {method for _, method, _ in bars}  # a method with no bar (every pair failed) takes no slot
    methods = [m for m in dict.fromkeys(label for label, _ in pair_groups(df)) if m in drawn]
    return SummaryPlotData(bars, methods, list(labels.values()), knn_title, failed)


def _draw_panel(ax: Any, data: SummaryPlotData, panel: str, colors: list[Any]) -> bool:
    """Bars side by side per arch within each method, error bars from (lo, hi), dots for several seeds."""
    width = 0.8 / max(1, len(data.archs))
    drawn = False
    for a, arch in enumerate(data.archs):
        shown = [(m, data.bars[(panel, method, arch)]) for m, method in enumerate(data.methods)
                 if (panel, method, arch) in data.bars]  # fmt: skip
        if not shown:
            continue
        drawn = True
        x = np.array([m for m, _ in shown]) + (a - (len(data.archs) - 1) / 2) * width
        means = np.array([e.mean for _, e in shown])
        ax.bar(x, means, width=width * 0.95, color=colors[a], label=arch)
        with_interval = [(xi, e) for xi, (_, e) in zip(x, shown, strict=True) if e.has_interval]
        if with_interval:
            xs = [xi for xi, _ in with_interval]
            # Clipped at 0: a hand-edited file can hold a number outside its own interval.
            below = [max(0.0, e.mean - e.lo) for _, e in with_interval]
            above = [max(0.0, e.hi - e.mean) for _, e in with_interval]
            ax.errorbar(xs, [e.mean for _, e in with_interval], yerr=[below, above], fmt="none",
                        ecolor="black", elinewidth=1, capsize=3)  # fmt: skip
        for xi, (_, e) in zip(x, shown, strict=True):
            if e.n > 1:
                ax.scatter([xi] * e.n, e.values, s=10, color="black", zorder=3, label="seed")
            top = max(e.hi if e.has_interval else e.mean, *e.values)
            ax.text(xi, top + 1, f"{e.mean:.1f}", ha="center", va="bottom", fontsize=8)
    return drawn


def summary_figure(data: SummaryPlotData) -> Any | None:
    """Two panels (k-NN, linear) on an Agg canvas, so no display or global backend is touched; None when
    there is no bar to draw."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not data.bars:
        return None
    fig = Figure(figsize=(max(8.0, 1.6 * len(data.methods) * 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    colors = [colormaps["tab10"](i % 10) for i in range(len(data.archs))]
    for ax, panel, title in zip(axes, PANELS, [data.knn_title, "Linear probe"], strict=True):
        ax.set_title(title)
        ax.set_xlabel("method")
        ax.set_ylabel("top-1 accuracy (%)")
        if not _draw_panel(ax, data, panel, colors):
            ax.text(0.5, 0.5, f"no {panel} results", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        # a long row label (``dino (weights: FILE)``) wrapped, so neighbouring labels never overlap
        names = [textwrap.fill(m, 22, break_long_words=False) for m in data.methods]
        ax.set_xticks(range(len(data.methods)), names, fontsize=8)
    # One legend under both panels, so it never hides a bar; "seed" once however many dots carry it.
    handles, names = [], []
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            if name not in names:
                handles.append(handle)
                names.append(name)
    order = sorted(range(len(names)), key=lambda i: names[i] == "seed")  # the archs first
    fig.legend([handles[i] for i in order], [names[i] for i in order], loc="outside lower center",
               ncol=max(1, len(names)))  # fmt: skip
    bars = list(data.bars.values())
    tops = [max(e.hi if e.has_interval else e.mean, *e.values) for e in bars]
    axes[0].set_ylim(0, max(tops) * 1.15 + 2)
    legend = ["whiskers: 95% interval over the test images"] if any(e.has_interval for e in bars) else []
    legend += ["dots: seeds (bar: their mean)"] if any(e.n > 1 for e in bars) else []
    note = f"\n{'; '.join(legend)}" if legend else ""
    note += f"\nfailed, not shown: {', '.join(data.failed)}" if data.failed else ""
    fig.suptitle(f"sslbench: top-1 accuracy by method and architecture{note}")
    return fig


def write_summary_plot(data: SummaryPlotData, path: Path) -> bool:
    """Write the figure atomically; False (nothing written) when there is no bar to draw."""
    fig = summary_figure(data)
    if fig is None:
        return False
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return True
