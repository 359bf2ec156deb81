"""The README's promises: its plugin example is the real file, and that file runs through ``sslbench run``."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

from sslbench.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "simsiam.py"
TINY = [
    "--epochs", "1", "--batch-size", "8", "--no-progress", "--set", "train.train_per_class=2",
    "--set", "eval.train_per_class=3", "--set", "eval.test_per_class=2",
    "--set", "eval.monitor_bank_per_class=2", "--set", "eval.monitor_test_per_class=1",
    "--set", "eval.linear_epochs=2",
]  # fmt: skip


def test_readme_shows_the_example_file_verbatim() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert EXAMPLE.read_text(encoding="utf-8").strip() in readme


def test_readme_commands_use_real_flags() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert 'pip install -e ".[dev,track,submit]"' in readme and "\npytest\n" in readme
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install -q -e ".[dev,track,submit]"' in ci  # the README's install is what CI installs
    assert "sslbench run --methods dino,byol --arch vit_s16" in readme
    submit = re.search(r"^sslbench submit (.*)$", readme.replace("\\\n", ""), re.MULTILINE)
    args = build_parser().parse_args(["submit", *shlex.split(submit[1])])  # every flag shown is real
    assert (args.nodes, args.gpus_per_node, args.time) == (2, 8, "2800")


def test_example_plugin_runs_end_to_end(tmp_path: Path, isolated_registry: None) -> None:
    out = tmp_path / "run"
    argv = ["run", "--plugin", str(EXAMPLE), "--methods", "simsiam", "--arch", "resnet18", "--out", str(out)]
    argv += TINY + ["--set", "simsiam.proj_dim=64", "--set", "simsiam.pred_hidden_dim=32"]
    assert main(argv) == 0
    record = json.loads((out / "simsiam-resnet18" / "eval.json").read_text())
    assert record["status"] == "ok"
    assert record["method_source"].startswith("plugin file")
    assert set(record["knn"]) == {"10", "20", "100", "200"}
    assert record["method_options"] == {"proj_dim": 64, "pred_hidden_dim": 32}


def test_the_example_plugin_keeps_the_method_contract(isolated_registry: None) -> None:
    """What the README's "Adding a method" shows a plugin author: the built-ins' contract, importable."""
    import sslbench
    from sslbench.testing import check_method

    (name,) = sslbench.load_plugin_file(EXAMPLE)
    assert check_method(name, options={"proj_dim": 64, "pred_hidden_dim": 32}) == ["resnet18", "vit_tiny16"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert 'check_method("simsiam", options={"proj_dim": 64, "pred_hidden_dim": 32})' in readme


def test_bf16_autocast_path_runs_on_the_cpu(tmp_path: Path) -> None:
    """The GPU's precision path (bf16 autocast) is exercised on the CPU, where CI runs."""
    out = tmp_path / "bf16"
    argv = ["run", "--methods", "simclr", "--arch", "resnet18", "--out", str(out)]
    argv += TINY + ["--set", "train.precision=bf16", "--set", "simclr.proj_hidden_dim=64"]
    assert main(argv) == 0
    record = json.loads((out / "simclr-resnet18" / "eval.json").read_text())
    assert record["protocol"]["precision"] == "bf16"
    assert math.isfinite(record["train"]["final_loss"])
