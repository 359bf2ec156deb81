"""Every bad input is answered by one message that says what was wrong and what to do, and no traceback.

Runs go through ``main(argv)`` in this process with the ``random`` method (nothing to train) or a tiny
schedule, so the file stays fast; one subprocess proves that no traceback reaches a real terminal.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import zipfile
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslbench.base.errors import SSLBenchError
from sslbench.cli import main
from sslbench.config import PRESETS
from sslbench.data.datasets import DATASET_CHOICES, load_dataset
from sslbench.method import registry
from sslbench.models.backbones import ARCHS
from sslbench.training.run_folder import RunLock

EVAL = ["--set", "eval.linear=false", "--set", "eval.train_per_class=2", "--set", "eval.test_per_class=2"]
QUICK = ["--methods", "random", "--arch", "resnet18", "--device", "cpu", "--no-progress", *EVAL]
TINY_TRAIN = ["--arch", "resnet18", "--device", "cpu", "--no-progress", "--epochs", "1", "--batch-size", "8",
              "--set", "train.train_per_class=2", "--set", "eval.monitor_every=0", *EVAL]  # fmt: skip
BUILT_IN_METHODS = [
    "barlow_twins", "byol", "dino", "dinov2", "ibot", "mae", "mocov2", "mocov3", "random", "simclr",
    "supervised", "swav", "vicreg",
]  # fmt: skip


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``sslbench run ARGV`` in this process: (exit status, stderr)."""
    code = main(["run", *argv])
    return code, capsys.readouterr().err


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The run must stop with status 2 and exactly one error line on stderr, no traceback; return it."""
    code, stderr = _run(capsys, *argv)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sslbench: error: "), stderr
    return lines[0]


def _png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


def _jpeg_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _tree_with_bad_files(root: Path) -> tuple[Path, Path]:
    """Two classes of two training images each, one of them unreadable: a cut-off JPEG and a text file
    named .jpg. Returns the two bad files."""
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            _png(root / split / cls / "00.png", seed=c)
    truncated, text = root / "train" / "a" / "cut.jpg", root / "train" / "b" / "notes.jpg"
    whole = _jpeg_bytes()
    truncated.write_bytes(whole[: len(whole) * 2 // 3])  # a download cut off mid-way: the header is intact
    text.write_text("not an image at all\n")
    return truncated, text


# --- names --------------------------------------------------------------------------------------------------


def test_unknown_method_suggests_and_lists(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _error(capsys, *QUICK, "--methods", "dnio", "--out", str(tmp_path / "out"))
    assert "unknown method 'dnio' (did you mean 'dino'?); valid methods: " in line
    assert all(name in line for name in BUILT_IN_METHODS)


def test_unknown_arch_lists_the_archs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _error(capsys, *QUICK, "--arch", "resnet81", "--out", str(tmp_path / "out"))
    assert "unknown arch 'resnet81'" in line and "did you mean 'resnet18'?" in line
    assert all(name in line for name in ARCHS)


def test_unknown_dataset_lists_the_datasets(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _error(capsys, *QUICK, "--dataset", "cifar11", "--out", str(tmp_path / "out"))
    assert "unknown dataset 'cifar11' (did you mean 'cifar10'?)" in line
    assert all(name in line for name in DATASET_CHOICES)


def test_unknown_preset_lists_the_presets(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _error(capsys, *QUICK, "--preset", "imgnet", "--out", str(tmp_path / "out"))
    assert "unknown preset 'imgnet' (did you mean 'imagenet'?)" in line
    assert all(name in line for name in PRESETS)


# --- config keys and files ----------------------------------------------------------------------------------


def test_misspelt_key_suggests_the_right_one(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _error(capsys, *QUICK, "--set", "train.batchsize=8", "--out", str(tmp_path / "out"))
    assert "unknown config key 'train.batchsize'; did you mean 'train.batch_size'?" in line


def test_misspelt_key_in_a_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("seed: 1\ntrian:\n  epochs: 3\n")
    line = _error(capsys, *QUICK, "--config", str(config), "--out", str(tmp_path / "out"))
    assert "unknown config key 'trian'; did you mean 'train'?" in line


def test_wrongly_typed_key_names_the_type(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _error(capsys, *QUICK, "--set", "train.epochs=three", "--out", str(tmp_path / "out"))
    assert "config key 'train.epochs' must be int, got 'three'" in line


def test_bad_images_takes_error_or_skip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _error(capsys, *QUICK, "--set", "bad_images=skipp", "--out", str(tmp_path / "out"))
    assert "config key 'bad_images' must be one of error, skip, got 'skipp'; did you mean 'skip'?" in line


def test_yaml_syntax_error_names_file_line_and_column(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\ntrain:\n  epochs: 3: 4\n")
    line = _error(capsys, *QUICK, "--config", str(bad), "--out", str(tmp_path / "out"))
    assert f"YAML syntax error in {bad}, line 3: mapping values are not allowed here at column 12" in line
    assert "'  epochs: 3: 4'" in line and "indentation" in line


# --- data ---------------------------------------------------------------------------------------------------


def test_missing_data_root_says_where_and_what_layout(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere"
    line = _error(capsys, *QUICK, "--dataset", f"imagefolder:{missing}", "--out", str(tmp_path / "out"))
    assert f"{missing}: no such folder; expected PATH/train/<class>/*.jpg and PATH/val/<class>/" in line
    line = _error(capsys, *QUICK, "--dataset", "cifar10", "--data-root", str(missing))
    assert f"CIFAR-10 not found; looked in: {missing} (missing)" in line
    assert "--download" in line and "train/<class>/*.jpg" in line


def test_empty_data_root_says_what_is_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _error(capsys, *QUICK, "--dataset", f"imagefolder:{empty}")
    assert f"{empty}: no train/ folder; expected PATH/train/<class>/*.jpg" in line
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "val" / "cat").mkdir(parents=True)
    line = _error(capsys, *QUICK, "--dataset", f"imagefolder:{empty}")
    assert f"{empty / 'train'}: class folders ['cat'] hold no images (.jpg, .jpeg, .png" in line
    line = _error(capsys, *QUICK, "--dataset", "cifar10", "--data-root", str(empty))
    assert f"CIFAR-10 not found; looked in: {empty} (unusable: " in line


def test_unreadable_images_stop_the_run_naming_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """With the default bad_images=error nothing is checked up front; the first read names the file,
    and the run stops there (every pair would read the same file)."""
    truncated, _ = _tree_with_bad_files(tmp_path / "data")
    out = tmp_path / "out"
    code, stderr = _run(capsys, *QUICK, "--dataset", f"imagefolder:{tmp_path / 'data'}",
                        "--set", "image_size=32", "--out", str(out))  # fmt: skip
    assert code == 2 and "Traceback" not in stderr
    assert f"{truncated}: not a readable image (image file is truncated" in stderr
    assert "drop unreadable images with --set bad_images=skip" in stderr
    RunLock(out).acquire().release()  # released on the way out


def test_skipped_images_are_counted_in_the_protocol(tmp_path: Path) -> None:
    _tree_with_bad_files(tmp_path / "data")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        code = main(["run", *QUICK, "--dataset", f"imagefolder:{tmp_path / 'data'}", "--set", "image_size=32",
                     "--set", "bad_images=skip", "--out", str(out)])  # fmt: skip
    assert code == 0
    record = json.loads((out / "random-resnet18" / "eval.json").read_text())
    assert record["protocol"]["skipped_images"] == 2


def test_unreadable_images_skipped_and_counted(tmp_path: Path) -> None:
    truncated, text = _tree_with_bad_files(tmp_path / "data")
    with pytest.warns(
        UserWarning, match=r"skipped 2 unreadable image file\(s\) of 6 \(bad_images=skip\)"
    ) as w:
        data = load_dataset(f"imagefolder:{tmp_path / 'data'}", bad_images="skip")
    assert len(w) == 1
    warning = str(w[0].message)
    assert f"{truncated} (image file is truncated" in warning
    assert f"{text} (not in an image format PIL can read)" in warning
    assert data.skipped_images == 2 and "2 unreadable skipped" in data.description
    assert (len(data.train), len(data.test)) == (2, 2) and data.train.labels.tolist() == [0, 1]
    assert all(data.train.load(i).size == (32, 32) for i in range(len(data.train)))
    assert load_dataset(f"imagefolder:{tmp_path / 'data'}").skipped_images == 0  # error: nothing checked


def test_skipping_every_image_of_a_class_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _png(root / "train" / "a" / "0.png")
    _png(root / "val" / "a" / "0.png")
    (root / "train" / "b").mkdir()
    (root / "train" / "b" / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(SSLBenchError) as caught:
        load_dataset(f"imagefolder:{root}", bad_images="skip")
    assert f"{root / 'train'}: class folders ['b'] hold no readable images" in str(caught.value)


def test_cifar10_zip_with_a_corrupt_member(tmp_path: Path) -> None:
    archive = tmp_path / "c10.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split in ("train", "test"):
            for c, cls in enumerate(("cat", "dog")):
                zf.writestr(f"{split}/{cls}/0000.jpg", _jpeg_bytes(seed=c))
        zf.writestr("train/dog/0001.jpg", b"this is no jpeg")
    with pytest.raises(SSLBenchError) as caught:
        load_dataset("cifar10", root=str(archive))
    message = str(caught.value)
    assert message.startswith(f"{archive}:train/dog/0001.jpg: not a readable image (not in an image format")
    assert "--set bad_images=skip" in message and "CIFAR-10 not found" not in message
    with pytest.warns(UserWarning, match=f"skipped 1 unreadable image file.*{archive}:train/dog/0001.jpg"):
        data = load_dataset("cifar10", root=str(archive), bad_images="skip")
    assert data.skipped_images == 1 and (len(data.train), len(data.test)) == (2, 2)


def test_batch_larger_than_the_dataset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Checked for every pair before anything trains or any folder is made."""
    out = tmp_path / "out"
    code, stderr = _run(capsys, "--methods", "supervised", *TINY_TRAIN, "--batch-size", "64",
                        "--out", str(out))  # fmt: skip
    assert code == 2 and "Traceback" not in stderr
    assert "batch size 64 is larger than the training set (20 images)" in stderr
    assert not out.exists()


# --- device -------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_requested_without_a_gpu(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _error(capsys, *QUICK, "--device", "cuda", "--out", str(tmp_path / "out"))
    assert (
        "device 'cuda' was requested but no CUDA GPU is available: use --device cpu or --device auto" in line
    )
    assert not (tmp_path / "out").exists()


# --- plugins ------------------------------------------------------------------------------------------------

RAISING_PLUGIN = 'raise RuntimeError("cannot find libfoo")\n'
BOOM_PLUGIN = """\
from sslbench import Method, register_method, two_views


@register_method("boom")
class Boom(Method):
    def view_recipe(self):
        return two_views()

    def training_step(self, views, labels, step):
        raise RuntimeError("boom went the method")
"""


def test_plugin_file_that_raises_on_import(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, isolated_registry: None
) -> None:
    plugin = tmp_path / "broken.py"
    plugin.write_text(RAISING_PLUGIN)
    line = _error(capsys, *QUICK, "--plugin", str(plugin), "--out", str(tmp_path / "out"))
    assert f"plugin {plugin} failed to import: RuntimeError: cannot find libfoo" in line


def test_installed_plugin_that_raises_on_import(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    isolated_registry: None,
) -> None:
    """A broken installed plugin is a warning that names it; asking for its method is a clear error."""
    (tmp_path / "sslbench_test_raising_plugin.py").write_text(RAISING_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    point = EntryPoint("fancy", "sslbench_test_raising_plugin", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [point])
    monkeypatch.setattr(registry, "_discovered", False)
    monkeypatch.setattr(registry, "_failed", {})
    with pytest.warns(UserWarning, match=r"plugin 'fancy' \(sslbench_test_raising_plugin\) failed to import"):
        line = _error(capsys, *QUICK, "--methods", "fancy", "--out", str(tmp_path / "out"))
    assert (
        "method 'fancy' is unavailable: its plugin failed to import "
        "(sslbench_test_raising_plugin: RuntimeError: cannot find libfoo)"
    ) in line


def test_plugin_whose_training_step_raises(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, isolated_registry: None
) -> None:
    plugin = tmp_path / "boom.py"
    plugin.write_text(BOOM_PLUGIN)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="no successful results"):
        code, stderr = _run(
            capsys, "--plugin", str(plugin), "--methods", "boom", *TINY_TRAIN, "--out", str(out)
        )
    assert code == 1 and "Traceback" not in stderr
    assert "1 pair(s) failed" in stderr and "boom-resnet18: RuntimeError: boom went the method" in stderr
    record = json.loads((out / "boom-resnet18" / "eval.json").read_text())
    assert (record["status"], record["method"]) == ("failed", "boom")
    assert "RuntimeError: boom went the method" in record["error"]
    assert record["method_source"] == f"plugin file {plugin}"
    assert "boom went the method" in (out / "boom-resnet18" / "traceback.txt").read_text()


def test_no_traceback_reaches_a_real_terminal(tmp_path: Path) -> None:
    """The one subprocess: a plugin raising an ordinary exception, through the installed entry point."""
    plugin = tmp_path / "broken.py"
    plugin.write_text(RAISING_PLUGIN)
    result = subprocess.run(
        [sys.executable, "-m", "sslbench", "run", *QUICK, "--plugin", str(plugin)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert (
        result.stderr
        == f"sslbench: error: plugin {plugin} failed to import: RuntimeError: cannot find libfoo\n"
    )
    assert result.stdout == ""


# --- a full disk --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file is written")
def test_full_disk_while_writing_results(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The disk fills up when the pair's eval.json is written: one line, status 2, no temporary left."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if "eval.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    line = _error(capsys, *QUICK, "--out", str(out))
    target = out / "random-resnet18" / "eval.json"
    assert line == (
        f"sslbench: error: no space left on the device while writing {target}: free some space or write "
        "elsewhere (--out); the previous version of the file, if any, is unchanged"
    )
    assert not target.exists() and not list(out.rglob("*.tmp"))
