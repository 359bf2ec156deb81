"""``sslbench eval``: networks trained elsewhere (or here), evaluated under the run's protocol.

Each weights file becomes a pair folder of a run folder, ``<name>-<arch>/eval.json``, written exactly as a
trained pair's, so ``sslbench report`` merges released checkpoints with runs trained here into one table.
The file's format, the network read from it and any partial load are recorded beside the numbers.
"""

from __future__ import annotations

import dataclasses
import re
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslbench.base.atomic_io import write_json_atomic, write_text_atomic
from sslbench.base.errors import SSLBenchError
from sslbench.config import RunConfig
from sslbench.data.datasets import DatasetSplits, load_dataset
from sslbench.evaluation.evaluate import evaluate_backbone
from sslbench.evaluation.features import feature_precision
from sslbench.models.backbones import arch_spec, create_backbone, effective_patch_size, set_fused_attention
from sslbench.models.weight_formats import load_backbone_weights
from sslbench.reporting.tables import load_results, write_report
from sslbench.training.environment import describe_environment
from sslbench.training.experiment import RunOutcome, evaluation_data, resolve_device
from sslbench.training.run_folder import prepare_out_dir
from sslbench.training.runner import evaluation_fields, evaluation_protocol, seed_everything
from sslbench.training.step import fused_attention_for, memory_format_for

WEIGHTS_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".safetensors", ".bin")


@dataclass(frozen=True)
class WeightsSpec:
    """One network to evaluate: where its weights are, what to call its row, which part to read."""

    source: str  # a file, or timm:<model_name>
    name: str | None = None  # the row's method name (default: from the file)
    part: str | None = None  # teacher, student, ... of a training checkpoint (default: the format's rule)
    allow_partial: bool = False  # load although keys are missing or unexpected (recorded)


def row_name(spec: WeightsSpec) -> str:
    """The row's name: given, or for sslbench's own ``<method>-<arch>/backbone.pt`` the method, or the
    file's stem (``timm:<name>``: the model name)."""
    if spec.name:
        return spec.name
    if spec.source.startswith("timm:"):
        return spec.source.split(":", 1)[1]
    path = Path(spec.source)
    if path.name == "backbone.pt" and "-" in path.parent.name:
        return path.parent.name.rsplit("-", 1)[0]
    name = path.name
    while Path(name).suffix in WEIGHTS_SUFFIXES:  # checkpoint.pth.tar -> checkpoint
        name = Path(name).stem
    return name or path.name


def _folder_names(specs: Sequence[WeightsSpec], arch: str) -> list[str]:
    """One folder per spec, ``<name>-<arch>``, numbered when two specs share a name."""
    names: list[str] = []
    for spec in specs:
        base = re.sub(r"[^A-Za-z0-9_.@]+", "_", row_name(spec)) + f"-{arch}"
        name, count = base, 1
        while name in names:
            count += 1
            name = f"{base}{count}"
        names.append(name)
    return names


def evaluate_weights(
    config: RunConfig, specs: Sequence[WeightsSpec], restart: str = "new", show_progress: bool = True
) -> RunOutcome:
    """Evaluate every weights file on ``config``'s dataset and protocol into one run folder; a file that
    fails to load is a failed row with its reason, and the others are still evaluated."""
    if not specs:
        raise SSLBenchError("no weights given: name at least one file (or timm:<model_name>)")
    if len(config.archs) != 1:
        raise SSLBenchError(
            f"sslbench eval reads each file into one arch; got --arch {','.join(config.archs) or '(none)'}: "
            "name exactly one, e.g. --arch vit_s16"
        )
    arch = config.archs[0]
    arch_spec(arch)
    device = resolve_device(config.device)
    data = load_dataset(
        config.dataset, config.data_root, config.image_size, config.download, bad_images=config.bad_images
    )
    eval_data = evaluation_data(config, data) or data
    environment = describe_environment(device, config.seed)
    out_dir, lock = prepare_out_dir(config, restart, environment)
    failed: list[str] = []
    try:
        for spec, folder in zip(specs, _folder_names(specs, arch), strict=True):
            for seed in config.seeds or [config.seed]:
                seed_config = dataclasses.replace(config, seed=seed)
                pair = f"{folder}-seed{seed}" if len(config.seeds) > 1 else folder
                pair_dir = out_dir / pair
                pair_dir.mkdir(parents=True, exist_ok=True)
                record = _evaluate_one(spec, arch, seed_config, eval_data, device, pair_dir)
                if record["status"] != "ok":
                    failed.append(f"{pair}: {record['error']}")
                if show_progress:
                    print(f"{pair}: {record['status']} ({record['total_wall_s']:.0f} s)")
                write_json_atomic(pair_dir / "eval.json", record)
        results = load_results([out_dir])
        write_report(results, out_dir)
    finally:
        lock.release()
    return RunOutcome(out_dir, results, failed)


def _evaluate_one(
    spec: WeightsSpec,
    arch: str,
    config: RunConfig,
    data: DatasetSplits,
    device: Any,
    pair_dir: Path,
) -> dict[str, Any]:
    """One file's eval.json record: its numbers and protocol, or why it failed."""
    started = time.perf_counter()
    record: dict[str, Any] = {
        "method": row_name(spec),
        "arch": arch,
        "variant": None,
        "seed": config.seed,
        "method_source": f"weights: {spec.source}",
    }
    try:
        seed_everything(config.seed)
        backbone = create_backbone(arch, data.image_size)
        loaded = load_backbone_weights(
            spec.source, backbone, part=spec.part, allow_partial=spec.allow_partial
        )
        # the layout and attention kernel a trained pair is evaluated with (build_method), so the same
        # weights give the same numbers to the last image
        backbone.to(device, memory_format=memory_format_for(device, backbone.family))
        if not fused_attention_for(device, feature_precision(config, device)[0]):
            set_fused_attention(backbone, False)
        cache_dir = pair_dir if config.eval.cache_features else None
        metrics = evaluate_backbone(backbone, config, data, device, cache_dir)
    except Exception as error:  # one unreadable file must not cost the others their rows
        reason = str(error)
        if not isinstance(error, SSLBenchError):
            write_text_atomic(pair_dir / "traceback.txt", traceback.format_exc())
            reason = f"{type(error).__name__}: {error} (traceback in {pair_dir / 'traceback.txt'})"
        protocol = {"seed": config.seed, "weights_source": spec.source}
        return record | {
            "status": "failed",
            "error": reason,
            "knn": None,
            "linear": None,
            "train": None,
            "protocol": protocol,
            "total_wall_s": round(time.perf_counter() - started, 2),
        }
    features_in, features_reason = feature_precision(config, device)
    protocol = {
        "dataset": data.name,
        "dataset_description": data.description,
        "image_size": data.image_size,
        "patch_size": effective_patch_size(arch, data.image_size),
        "crops": "none (evaluated only)",
        "epochs": 0,
        "seed": config.seed,
        "device": str(device),
        "feature_source": f"weights: {Path(spec.source).name}",
        "feature_precision": features_in,
        "feature_precision_reason": features_reason,
        "linear_features": backbone.linear_features_description,
        **{f"weights_{key}": value for key, value in loaded.protocol().items()},
    }
    return record | {
        "status": "ok",
        "error": None,
        "weights": loaded.protocol(),
        **evaluation_fields(metrics),
        "train": None,
        "eval_s": round(time.perf_counter() - started, 2),
        "total_wall_s": round(time.perf_counter() - started, 2),
        "protocol": protocol | evaluation_protocol(config, data, metrics),
    }
