"""Ablations: one method trained in several variants under one schedule, and their table.

Variants are config overrides of the one registered method, never copies of it. ``dino`` has the DINO
paper's ablations built in (Caron et al. 2021): its collapse study (Sec. 5.3, Fig. 7: no centering, no
sharpening) and Table 7's rows (no momentum teacher, MSE instead of cross-entropy, with a predictor,
without multi-crop), beside full DINO.
Any method's config key can be varied with ``--vary key=v1,v2``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from sslbench.base.atomic_io import atomic_path, write_text_atomic
from sslbench.base.errors import SSLBenchError
from sslbench.config import RunConfig, build_dataclass, parse_set
from sslbench.method.registry import get_method
from sslbench.reporting.tables import headline_knn, linear_note, protocol_summary
from sslbench.training.experiment import Variant


def dino_variants(config: RunConfig) -> list[Variant]:
    """The DINO paper's ablations, each the smallest override that removes one ingredient."""
    dino = get_method("dino")
    student_temp = build_dataclass(dino.Config, config.method_options.get("dino", {}), "dino").student_temp
    return [
        Variant("full", {}),
        Variant("no_centering", {"dino": {"center_momentum": 1.0}}),  # the center stays at its initial 0
        Variant(
            "no_sharpening", {"dino": {"teacher_temp": student_temp, "warmup_teacher_temp": student_temp}}
        ),
        Variant("no_momentum_teacher", {"train": {"ema_momentum": 0.0, "ema_momentum_end": 0.0}}),
        Variant("mse_loss", {"dino": {"loss": "mse"}}),
        Variant("with_predictor", {"dino": {"predictor": True}}),
        # Without local crops the reference recommends wider global crops: scale (0.14, 1).
        Variant("no_multicrop", {"dino": {"local_crops_number": 0, "global_crops_scale": [0.14, 1.0]}}),
    ]


def vary_variants(assignments: list[str]) -> list[Variant]:
    """``["dino.teacher_temp=0.04,0.07"]`` -> one variant per value, named ``teacher_temp=0.04``."""
    variants = []
    for assignment in assignments:
        key, sep, values = assignment.partition("=")
        if not sep or not values:
            raise SSLBenchError(
                f"--vary expects key=v1,v2 (e.g. dino.teacher_temp=0.04,0.07), got '{assignment}'"
            )
        for value in re.split(r",(?![^\[]*\])", values):  # commas inside [..] belong to a list value
            if not value.strip():
                raise SSLBenchError(f"--vary {assignment}: an empty value; give e.g. {key}=0.04,0.07")
            name = f"{key.rsplit('.', 1)[-1]}={value.strip()}"
            if name in {v.name for v in variants}:
                raise SSLBenchError(f"--vary {assignment}: the value {value.strip()} is given twice")
            variants.append(Variant(name, parse_set(f"{key}={value.strip()}")))
    return variants


def variants_for(method: str, config: RunConfig, assignments: list[str]) -> list[Variant]:
    """The variants ``--vary`` names, or the method's built-in table; an unknown method is named first."""
    get_method(method)
    if assignments:
        return vary_variants(assignments)
    if method == "dino":
        return dino_variants(config)
    raise SSLBenchError(
        f"no built-in ablation for '{method}': give the keys to vary, e.g. --vary {method}.KEY=v1,v2 "
        "(the built-in table is for dino)"
    )


DIAGNOSTICS = ["embedding_std_ratio", "effective_rank", "teacher_entropy", "teacher_student_kl"]


def ablation_table(results: pd.DataFrame, variants: list[Variant]) -> pd.DataFrame:
    """Rows = variants in the order run; k-NN, linear, collapse verdict, diagnostics and what changed."""
    rows = []
    changes = {v.name: _describe(v.overrides) for v in variants}
    for _, row in results.iterrows():
        knn = headline_knn(row)
        std, healthy = row.get("embedding_std"), row.get("embedding_std_healthy")
        rows.append(
            {
                "variant": row.get("variant"),
                "arch": row["arch"],
                "status": row["status"],
                "k-NN": knn,
                "linear": row.get("linear_top1"),
                "collapsed": bool(row.get("collapsed")),
                "embedding_std_ratio": std / healthy if healthy and std == std else None,
                "effective_rank": row.get("effective_rank"),
                "teacher_entropy": row.get("teacher_entropy"),
                "teacher_student_kl": row.get("teacher_student_kl"),
                "override": changes.get(row.get("variant"), ""),
            }
        )
    table = pd.DataFrame(rows)
    order = {v.name: i for i, v in enumerate(variants)}
    return table.sort_values("variant", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


def _describe(overrides: dict, prefix: str = "") -> str:
    parts = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            parts.append(_describe(value, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key}={value}")
    return ", ".join(p for p in parts if p) or "(none)"


def write_ablation_table(table: pd.DataFrame, results: pd.DataFrame, out_dir: Path, method: str) -> str:
    """ablation.csv and ablation.md (the table, then the protocol); returns the markdown."""
    with atomic_path(out_dir / "ablation.csv") as tmp:
        table.to_csv(tmp, index=False)
    shown = table.copy()
    for column in ["k-NN", "linear", *DIAGNOSTICS]:
        shown[column] = shown[column].map(lambda v: "–" if v is None or v != v else f"{v:.3g}")
    shown["collapsed"] = shown["collapsed"].map({True: "yes", False: "no"})
    note = linear_note(results)
    text = f"# Ablation of {method}\n\n{shown.to_markdown(index=False)}\n\n{note}\n\nProtocol:\n"
    text += "\n".join(f"- {line}" for line in protocol_summary(results)) + "\n"
    write_text_atomic(out_dir / "ablation.md", text)
    return text
