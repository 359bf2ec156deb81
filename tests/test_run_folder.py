"""One run per folder: unique names, a lock while a run writes, and the rules for --resume and --force."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from sslbench.base.errors import SSLBenchError
from sslbench.cli import main
from sslbench.training.run_folder import RunLock, check_reuse, config_differences, new_run_dir

TINY = [
    "run",
    "--methods=random",
    "--arch=resnet18",
    "--device=cpu",
    "--no-progress",
    "--set=eval.linear=false",
    "--set=eval.train_per_class=2",
    "--set=eval.test_per_class=2",
]


def test_new_run_dirs_never_collide(tmp_path):
    names = {new_run_dir(tmp_path, "20260101-120000-quick").name for _ in range(3)}
    assert names == {"20260101-120000-quick", "20260101-120000-quick-2", "20260101-120000-quick-3"}


def test_a_folder_in_use_is_refused_with_its_owner(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(SSLBenchError) as info:
            RunLock(tmp_path).acquire()
        message = str(info.value)
        assert f"in use by process {os.getpid()}" in message and "--out" in message
    RunLock(tmp_path).acquire().release()  # released


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path):
    """The lock is the operating system's, so it ends with the process, however it ends."""
    script = (
        "import os, pathlib; from sslbench.training.run_folder import RunLock; "
        f"RunLock(pathlib.Path({str(tmp_path)!r})).acquire(); os._exit(9)"  # no release: killed
    )
    subprocess.run([sys.executable, "-c", script], check=False)
    assert (tmp_path / ".lock").exists()
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_force_removes_only_what_a_run_wrote(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"seed": 0}))
    (tmp_path / "table.md").write_text("x")
    (tmp_path / "dino-vit_s16").mkdir()
    (tmp_path / "dino-vit_s16" / "eval.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "src").mkdir()
    check_reuse(tmp_path, {"seed": 1}, "force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "src"]


def test_config_differences_name_each_changed_key():
    saved = {"seed": 0, "train": {"lr": 5e-4, "epochs": 2}, "out": "a", "device": "cpu"}
    current = {"seed": 0, "train": {"lr": 1e-3, "epochs": 2}, "out": "b", "device": "cuda"}
    assert config_differences(saved, current) == ["device: cpu -> cuda", "train.lr: 0.0005 -> 0.001"]


def test_check_reuse_rules(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"seed": 0}))
    (tmp_path / "dino-vit_s16").mkdir()
    (tmp_path / "dino-vit_s16" / "metrics.jsonl").write_text("")
    with pytest.raises(SSLBenchError, match="already holds a run: add --resume.*--force"):
        check_reuse(tmp_path, {"seed": 0}, "new")
    check_reuse(tmp_path, {"seed": 0}, "resume")  # same config: fine
    with pytest.raises(SSLBenchError, match="seed: 0 -> 1.*--force"):
        check_reuse(tmp_path, {"seed": 1}, "resume")
    check_reuse(tmp_path, {"seed": 1}, "force")
    assert list(tmp_path.iterdir()) == []  # a run's files and pair folders only


def test_cli_resume_and_force(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, f"--out={out}"]) == 0
    first = json.loads((out / "random-resnet18" / "eval.json").read_text())
    RunLock(out).acquire().release()  # the run let go of its folder

    assert main([*TINY, f"--out={out}"]) == 2
    assert "add --resume to continue it" in capsys.readouterr().err

    assert main([*TINY, f"--out={out}", "--resume"]) == 0  # nothing left to do: the pair stands
    assert json.loads((out / "random-resnet18" / "eval.json").read_text()) == first

    assert main([*TINY, f"--out={out}", "--resume", "--seed=1"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "seed: 0 -> 1" in err and "Traceback" not in err

    assert main([*TINY, f"--out={out}", "--force", "--seed=1"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1


def test_resume_needs_out(capsys):
    assert main([*TINY, "--resume"]) == 2
    assert "--resume needs the run folder: add --out" in capsys.readouterr().err


def test_every_run_records_its_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(TINY) == 0
    (run,) = (tmp_path / "results").iterdir()
    assert json.loads((run / "environment.json").read_text())["run_id"] == run.name
