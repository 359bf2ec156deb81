"""``sslbench export``: a run's evaluated network, written so other tools load it without key surgery.

The pair's ``backbone.pt`` (the network its numbers came from) and its ``eval.json`` (arch, image size)
are all that is read; the writing itself is ``sslbench.models.weight_export``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sslbench.base.errors import SSLBenchError
from sslbench.models.weight_export import ExportedWeights, export_backbone


def exportable_pairs(run_dir: Path) -> list[str]:
    """The run's pair folders that hold the weights they were evaluated with."""
    if not run_dir.is_dir():
        raise SSLBenchError(f"run folder '{run_dir}' does not exist (expected results/<run>/)")
    return sorted(
        p.name for p in run_dir.iterdir() if (p / "backbone.pt").is_file() and (p / "eval.json").is_file()
    )


def export_pair(
    run_dir: Path, pair: str | None, fmt: str, out_dir: Path | None, overwrite: bool
) -> ExportedWeights:
    """Export ``pair`` of ``run_dir`` (the only pair, when there is one) into ``out_dir`` (default:
    ``RUN/export/<pair>-<format>/``)."""
    pairs = exportable_pairs(run_dir)
    if not pairs:
        raise SSLBenchError(
            f"{run_dir} holds no pair with backbone.pt and eval.json (a run with train.save_weights=false "
            "keeps no weights)"
        )
    if pair is None:
        if len(pairs) > 1:
            raise SSLBenchError(
                f"{run_dir} holds {len(pairs)} pairs: choose one with --pair ({', '.join(pairs)})"
            )
        pair = pairs[0]
    if pair not in pairs:
        raise SSLBenchError(f"no pair '{pair}' with weights in {run_dir} (pairs: {', '.join(pairs)})")
    record = json.loads((run_dir / pair / "eval.json").read_text(encoding="utf-8"))
    protocol = record.get("protocol") or {}
    arch, image_size = record.get("arch"), protocol.get("image_size")
    if not arch or not image_size:
        raise SSLBenchError(f"{run_dir / pair / 'eval.json'} does not say the pair's arch and image size")
    state = torch.load(run_dir / pair / "backbone.pt", map_location="cpu", weights_only=True)
    target = out_dir if out_dir is not None else run_dir / "export" / f"{pair}-{fmt}"
    mean, std = protocol.get("normalize_mean"), protocol.get("normalize_std")
    normalisation = {"mean": tuple(mean), "std": tuple(std)} if mean and std else {}
    return export_backbone(state, arch, int(image_size), target, fmt, overwrite=overwrite, **normalisation)
