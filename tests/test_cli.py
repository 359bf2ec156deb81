"""The command line end to end: a tiny run of every method, the report, the listing, and every error path.

Runs go through ``main(argv)`` in this process with tiny settings (1 epoch, a few images per class of the
embedded 32 px dataset), so the whole file stays within a couple of CPU minutes.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_session import read_eval as _eval
from cli_session import run_cli as _main

from sslbench.base.precision import precision_choice
from sslbench.cli import main
from sslbench.config import load_yaml, resolve_config
from sslbench.data.datasets import DATASET_CHOICES
from sslbench.method.registry import get_method, list_methods

TINY = [
    "--epochs", "1", "--batch-size", "8", "--no-progress",
    "--set", "train.train_per_class=2", "--set", "eval.train_per_class=3", "--set", "eval.test_per_class=2",
    "--set", "eval.monitor_bank_per_class=2", "--set", "eval.monitor_test_per_class=1",
    "--set", "eval.linear_epochs=2", "--set", "train.warmup_epochs=0",
    "--set", "dino.out_dim=64", "--set", "dino.hidden_dim=64", "--set", "dino.local_crops_number=1",
    "--set", "byol.proj_hidden_dim=64", "--set", "byol.pred_hidden_dim=64",
    "--set", "simclr.proj_hidden_dim=64",
]  # fmt: skip
METHODS = ["dino", "byol", "simclr", "supervised", "random"]
MODULES = {"dino": "dino", "byol": "byol", "simclr": "simclr", "supervised": "supervised",
           "random": "random_init"}  # fmt: skip
ARCHS = ["resnet18", "vit_tiny16"]
ARCHS_FAMILY = {"resnet18": "resnet", "vit_tiny16": "vit"}
CPU = torch.device("cpu")
REPORT_FILES = ["summary.csv", "table.md", "table.tex", "summary.png"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str, str]:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    code, stdout, stderr = _main(["run", "--methods", ",".join(METHODS), "--arch", ",".join(ARCHS), *TINY,
                                  "--out", str(out)])  # fmt: skip
    return out, code, stdout, stderr


# --- the tiny run of every method ------------------------------------------------------------------------


def test_methods_all_writes_one_table_with_every_method(tmp_path: Path) -> None:
    """``--methods all`` on both small archs: a row per registered method, a pair that does not apply
    written as such (n/a, with its reason), every other pair trained and evaluated."""
    shrink = [
        "dino.out_dim=64", "dino.hidden_dim=64", "dino.local_crops_number=1", "ibot.out_dim=64",
        "ibot.hidden_dim=64", "ibot.local_crops_number=1", "dinov2.out_dim=64", "dinov2.hidden_dim=64",
        "dinov2.local_crops_number=1", "swav.num_prototypes=16", "swav.local_crops_number=1",
        "mocov2.queue_size=32", "mae.decoder_dim=32", "mae.decoder_depth=1",
        *[f"{m}.{k}=64" for m in ("byol", "mocov3") for k in ("proj_hidden_dim", "pred_hidden_dim")],
        *[f"{m}.{k}=64" for m in ("barlow_twins", "vicreg", "simclr") for k in ("proj_hidden_dim",)],
    ]  # fmt: skip
    out = tmp_path / "all"
    args = ["run", "--methods", "all", "--arch", ",".join(ARCHS), "--epochs", "1", "--batch-size", "8",
            "--no-progress", "--set", "train.train_per_class=1", "--set", "eval.train_per_class=2",
            "--set", "eval.test_per_class=1", "--set", "eval.monitor_every=0", "--set", "eval.linear=false",
            "--set", "train.save_weights=false", "--out", str(out)]  # fmt: skip
    code, stdout, stderr = _main(args + [item for key in shrink for item in ("--set", key)])
    assert code == 0, stderr
    table = (out / "table.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(list_methods()) <= set(rows)
    for name in list_methods():
        for arch in ARCHS:
            record = _eval(out, f"{name}-{arch}")
            applies = ARCHS_FAMILY[arch] in get_method(name).families
            assert record["status"] == ("ok" if applies else "not applicable"), (name, arch, record["error"])
        assert ("n/a" in rows[name]) == (get_method(name).families == ("vit",))


def test_tiny_run_writes_every_file(tiny_run: tuple[Path, int, str, str]) -> None:
    out, code, stdout, stderr = tiny_run
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert (out / "config.yaml").is_file()
    for name in REPORT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for method in METHODS:
        for arch in ARCHS:
            pair = out / f"{method}-{arch}"
            assert (pair / "eval.json").is_file()
            assert (pair / "metrics.jsonl").is_file() == (method != "random")
            assert not (pair / "traceback.txt").exists()
    assert not list(out.rglob("*.tmp*")), "a temporary file was left behind"
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_run_records_results_and_protocol(tiny_run: tuple[Path, int, str, str]) -> None:
    out = tiny_run[0]
    hashes = set()
    for method in METHODS:
        for arch in ARCHS:
            record = _eval(out, f"{method}-{arch}")
            assert (record["method"], record["arch"]) == (method, arch)
            assert (record["status"], record["error"]) == ("ok", None)
            assert record["method_source"] == f"built-in (sslbench_methods.{MODULES[method]})"
            assert set(record["knn"]) == {"10", "20", "100", "200"}
            assert all(0.0 <= v <= 100.0 for v in record["knn"].values())
            assert 0.0 <= record["linear"]["top1"] <= 100.0
            assert record["linear"]["best_lr"] in (0.01, 0.1, 1.0)
            protocol = record["protocol"]
            assert protocol["knn_k"] == 20
            assert protocol["knn_temperature"] == 0.07
            assert (protocol["precision"], protocol["precision_reason"]) == precision_choice("auto", CPU)
            assert protocol["feature_precision"] == protocol["precision"]
            untrained = "none (untrained)"
            assert protocol["blur"] == (untrained if method == "random" else "none (crops < 96 px)")
            assert protocol["seed"] == 0
            assert protocol["batch_size"] == 8
            assert protocol["image_size"] == 32
            assert protocol["dataset"] == "embedded"
            assert protocol["device"] == "cpu"
            assert (protocol["knn_bank_images"], protocol["test_images"]) == (30, 20)
            assert re.fullmatch(r"[0-9a-f]{12}", protocol["config_hash"])
            hashes.add(protocol["config_hash"])
            assert protocol["patch_size"] == (4 if arch == "vit_tiny16" else None)
            crops = {"dino": "2x32 + 1x16", "random": "none (untrained)"}.get(method, "2x32")
            assert protocol["crops"] == crops
            source = {"dino": "teacher backbone", "random": "untrained backbone"}.get(method, "backbone")
            assert protocol["feature_source"] == source
            if method == "random":
                assert (protocol["epochs"], protocol["train_images"]) == (0, 0)
            else:
                assert (protocol["epochs"], protocol["train_images"]) == (1, 20)
                assert record["train"]["iterations"] == 2
                assert math.isfinite(record["train"]["final_loss"])
                assert {"wall_s", "monitor_s", "checkpoint_s", "logging_s"} <= set(record["train"])
            assert record["eval_s"] > 0
    assert len(hashes) == len(METHODS) * len(ARCHS)  # every pair's settings differ somewhere
    dino = _eval(out, "dino-resnet18")["method_options"]
    assert (dino["out_dim"], dino["hidden_dim"], dino["local_crops_number"]) == (64, 64, 1)


def test_tiny_run_metrics_config_and_tables(tiny_run: tuple[Path, int, str, str]) -> None:
    out, _, stdout, _ = tiny_run
    metrics = (out / "dino-vit_tiny16" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in metrics]
    train = [r for r in records if r["kind"] == "train"]
    assert train[0]["iteration"] == 0 and math.isfinite(train[0]["loss"]) and "teacher_temp" in train[0]
    assert train[-1]["iteration"] == 1
    diagnostics = ("embedding_std", "embedding_std_healthy", "effective_rank", "teacher_entropy")
    for key in (*diagnostics, "teacher_student_kl"):
        assert math.isfinite(train[-1][key]), key
    monitor = [r for r in records if r["kind"] == "monitor"]
    assert [r["epoch"] for r in monitor] == [0, 1]  # before training and after the one epoch
    assert all({"knn_student", "knn_teacher"} <= set(r) for r in monitor)
    dino = json.loads((out / "dino-vit_tiny16" / "eval.json").read_text())
    assert dino["collapse"]["collapsed"] in (True, False) and "embedding_std" in dino["collapse"]
    assert (out / "dino-vit_tiny16" / "backbone.pt").is_file()

    written = load_yaml(out / "config.yaml")
    config = resolve_config([written], list(list_methods()))  # the record is itself a valid --config
    assert (config.methods, config.archs, config.out) == (METHODS, ARCHS, str(out))
    assert (config.train.epochs, config.train.batch_size, config.eval.linear_epochs) == (1, 8, 2)
    assert config.method_options["dino"]["out_dim"] == 64

    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == len(METHODS) * len(ARCHS)
    assert set(summary["status"]) == {"ok"}
    table = (out / "table.md").read_text()
    tex = (out / "table.tex").read_text()
    for method in METHODS:
        assert method in stdout and method in table and method in tex
    assert "vit_tiny16 (patch 4)" in stdout
    assert "knn_k: 20" in stdout and "knn_temperature: 0.07" in stdout
    assert f"wrote {out}" in stdout
    assert "failed" not in stdout


@pytest.mark.parametrize(("method", "arch"), [("simclr", "resnet18"), ("dino", "vit_tiny16")])
def test_same_pair_gives_the_same_numbers(
    tiny_run: tuple[Path, int, str, str], tmp_path: Path, method: str, arch: str
) -> None:
    """A pair again, alone in a new run, at the machine's auto precision (bf16 where the CPU has it):
    identical numbers to the ones in the big run."""
    again = tmp_path / "again"
    code, _, stderr = _main(["run", "--methods", method, "--arch", arch, *TINY, "--out", str(again)])
    assert code == 0, stderr
    first, second = _eval(tiny_run[0], f"{method}-{arch}"), _eval(again, f"{method}-{arch}")
    assert second["knn"] == first["knn"]
    assert second["linear"] == first["linear"]
    assert second["train"]["final_loss"] == first["train"]["final_loss"]
    assert second["protocol"]["config_hash"] == first["protocol"]["config_hash"]


# --- report and list -------------------------------------------------------------------------------------


def test_report_rebuilds_the_tables_from_files(tiny_run: tuple[Path, int, str, str], tmp_path: Path) -> None:
    copy = tmp_path / tiny_run[0].name
    shutil.copytree(tiny_run[0], copy)
    for name in REPORT_FILES:
        (copy / name).unlink()
    for metrics in copy.rglob("metrics.jsonl"):
        metrics.unlink()  # only eval.json files are read
    code, stdout, stderr = _main(["report", str(copy)])
    assert code == 0, stderr
    for name in ["summary.csv", "table.md", "table.tex"]:
        assert (copy / name).read_text() == (tiny_run[0] / name).read_text(), name
    assert (copy / "summary.png").is_file()
    assert f"wrote {copy}" in stdout
    for method in METHODS:
        assert method in stdout


def test_report_merges_two_runs(tiny_run: tuple[Path, int, str, str], tmp_path: Path) -> None:
    first, second, merged = tmp_path / "run-a", tmp_path / "run-b", tmp_path / "merged"
    for run, methods in ((first, ["dino", "byol"]), (second, ["simclr", "dino"])):
        for method in methods:
            target = run / f"{method}-resnet18"
            target.mkdir(parents=True)
            shutil.copy(tiny_run[0] / f"{method}-resnet18" / "eval.json", target / "eval.json")
    replaced = _eval(second, "dino-resnet18")
    replaced["knn"]["20"] = 99.5
    (second / "dino-resnet18" / "eval.json").write_text(json.dumps(replaced))

    with pytest.warns(UserWarning, match="replaced by run 'run-b'"):
        code, stdout, stderr = _main(["report", str(first), str(second), "--out", str(merged)])
    assert code == 0, stderr
    summary = pd.read_csv(merged / "summary.csv")
    assert list(summary["method"]) == ["byol", "dino", "simclr"]
    assert dict(zip(summary["method"], summary["run"], strict=True)) == {
        "dino": "run-b", "byol": "run-a", "simclr": "run-b"}  # fmt: skip
    assert "99.5" in stdout and "99.5" in (merged / "table.md").read_text()
    assert "run-a, run-b" in (merged / "table.md").read_text()
    assert not (first / "table.md").exists()  # --out puts the merged tables elsewhere


def test_list_shows_methods_archs_datasets_presets() -> None:
    code, stdout, _ = _main(["list"])
    assert code == 0
    sections = re.split(r"^(methods|archs|datasets|presets):$", stdout, flags=re.M)
    body = dict(zip(sections[1::2], sections[2::2], strict=True))
    assert list(body) == ["methods", "archs", "datasets", "presets"]
    for method in METHODS:
        source = rf"built-in \(sslbench_methods\.{MODULES[method]}\)"
        paper = re.escape(get_method(method).paper)
        assert re.search(rf"^  {method}\s+{paper}; {source}$", body["methods"], re.M)
    for arch in ["resnet18", "resnet50", "vit_tiny16", "vit_s16", "vit_b16"]:
        assert re.search(rf"^  {arch}\s+\S", body["archs"], re.M)
    assert "timm vit_tiny_patch16_224" in body["archs"]
    assert body["datasets"].split() == list(DATASET_CHOICES)
    for preset in ["quick", "cifar10", "imagenet", "imagenet-boost"]:
        assert re.search(rf"^  {preset}\s+{preset}: ", body["presets"], re.M)


# --- errors ------------------------------------------------------------------------------------------------


def _single_error(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("sslbench: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


ERRORS = {
    "unknown method": (["--methods", "dnio"], "unknown method 'dnio' (did you mean 'dino'?)"),
    "unknown arch": (["--arch", "vit_tiny"], "unknown arch 'vit_tiny' (did you mean 'vit_tiny16'?)"),
    "unknown dataset": (["--dataset", "cifar11"], "unknown dataset 'cifar11' (did you mean 'cifar10'?)"),
    "unknown preset": (["--preset", "quik"], "unknown preset 'quik' (did you mean 'quick'?)"),
    "misspelt key": (["--set", "train.epoch=3"], "key 'train.epoch'; did you mean 'train.epochs'?"),
    "misspelt method key": (["--set", "dino.out_dimm=3"], "did you mean 'dino.out_dim'?"),
    "wrong type": (["--set", "train.epochs=abc"], "config key 'train.epochs' must be int, got 'abc'"),
    "set without value": (["--set", "train.epochs"], "--set expects key=value"),
    "missing data": (["--dataset", "imagefolder:/nonexistent"], "/nonexistent: no such folder"),
    "missing config": (["--config", "/nonexistent/run.yaml"], "config file not found: /nonexistent/run.yaml"),
    "missing plugin": (["--plugin", "/nonexistent/p.py"], "plugin file not found: /nonexistent/p.py"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_exit_2_with_one_line(case: str, tmp_path: Path, isolated_registry: None) -> None:
    args, expected = ERRORS[case]
    out = tmp_path / "out"
    argv = ["run", "--methods", "dino", "--arch", "resnet18", *TINY, *args, "--out", str(out)]
    code, _, stderr = _main(argv)
    assert code == 2
    assert expected in _single_error(stderr)
    assert not out.exists()  # everything is checked before a folder is made


def test_yaml_syntax_error_in_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\ntrain:\n  epochs: 3\n bad: 2\n")
    code, _, stderr = _main(["run", "--methods", "random", "--arch", "resnet18", "--config", str(bad),
                             "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    assert f"YAML syntax error in {bad}, line 4" in _single_error(stderr)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_a_gpu(tmp_path: Path) -> None:
    code, _, stderr = _main(["run", "--methods", "random", "--arch", "resnet18", "--device", "cuda",
                             "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    assert "no CUDA GPU is available" in _single_error(stderr)


def test_report_of_a_missing_folder(tmp_path: Path) -> None:
    code, _, stderr = _main(["report", str(tmp_path / "nope")])
    assert code == 2
    assert "does not exist" in _single_error(stderr)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["run", "--recipe", "fastest"])
    assert caught.value.code == 2
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


def test_batch_larger_than_the_dataset_is_refused_before_training(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, stderr = _main(["run", "--methods", "supervised", "--arch", "resnet18", *TINY,
                             "--batch-size", "64", "--out", str(out)])  # fmt: skip
    assert code == 2
    assert "Traceback" not in stderr
    message = "batch size 64 is larger than the training set (20 images) of supervised-resnet18"
    assert f"{message}: lower --batch-size" in stderr
    assert not out.exists()  # refused before any folder was made


BOOM_PLUGIN = """\
from sslbench import Method, register_method, two_views


@register_method("boom")
class Boom(Method):
    def view_recipe(self):
        return two_views()

    def training_step(self, views, labels, step):
        raise RuntimeError("boom went the method")
"""


def test_a_failing_pair_is_recorded_and_the_others_finish(tmp_path: Path, isolated_registry: None) -> None:
    plugin = tmp_path / "boom.py"
    plugin.write_text(BOOM_PLUGIN)
    out = tmp_path / "out"
    code, stdout, stderr = _main(["run", "--plugin", str(plugin), "--methods", "boom,random",
                                  "--arch", "resnet18", *TINY, "--out", str(out)])  # fmt: skip
    assert code == 1
    assert "1 pair(s) failed" in stderr
    assert "boom-resnet18: RuntimeError: boom went the method (method 'boom' from plugin file" in stderr
    failed = _eval(out, "boom-resnet18")
    assert failed["status"] == "failed"
    assert failed["error"] == (
        f"RuntimeError: boom went the method (method 'boom' from plugin file {plugin}; "
        f"traceback in {out / 'boom-resnet18' / 'traceback.txt'})"
    )
    assert failed["method_source"] == f"plugin file {plugin}"
    assert "RuntimeError: boom went the method" in (out / "boom-resnet18" / "traceback.txt").read_text()
    assert _eval(out, "random-resnet18")["status"] == "ok"
    summary = pd.read_csv(out / "summary.csv")
    assert dict(zip(summary["method"], summary["status"], strict=True)) == {"boom": "failed", "random": "ok"}
    table = (out / "table.md").read_text()
    assert re.search(r"^\| boom\s+\|\s+failed\s+\|\s+failed\s+\|$", table, re.M)
    assert "boom/resnet18" in table and "boom went the method" in table
    assert "failed" in stdout
    assert (out / "summary.png").is_file()
