"""What a new user runs into first: an empty --methods or --arch, an --out that cannot hold a run, a
--resume with nothing to resume, a tiny ImageFolder tree with unreadable images, a plugin file to list,
and the one line per pair that says how far a run is.

Every refusal is one line, status 2, no traceback, and leaves nothing on disk. Runs go through
``main(argv)`` in this process with the ``random`` method (nothing to train) or a check that fires before
training, so the file stays fast.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
from test_bad_input import BUILT_IN_METHODS, QUICK, TINY_TRAIN, _error, _jpeg_bytes, _png, _run

from sslbench.cli import build_parser, main, resume_command
from sslbench.models.backbones import ARCHS
from sslbench.training.experiment import RunProgress

PROGRESS = [arg for arg in QUICK if arg != "--no-progress"]  # QUICK with the per-pair lines shown


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (``None`` for a folder): to show nothing changed."""
    return {
        str(path.relative_to(root)): None if path.is_dir() else path.read_bytes() for path in root.rglob("*")
    }


# --- nothing to run -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("methods", ["", ","])
def test_empty_methods_is_refused_before_anything_is_written(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, methods: str
) -> None:
    monkeypatch.chdir(tmp_path)  # a default results/ would land here
    out = tmp_path / "out"
    line = _error(capsys, *QUICK, "--methods", methods, "--out", str(out))
    assert line == (
        "sslbench: error: no method given: name at least one with --methods "
        f"(valid: {', '.join(BUILT_IN_METHODS)})"
    )
    assert not out.exists()
    line = _error(capsys, *QUICK, "--methods", methods)  # no --out: no results/<date>-quick either
    assert line.startswith("sslbench: error: no method given")
    assert list(tmp_path.iterdir()) == []


def test_empty_arch_is_refused_before_anything_is_written(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    line = _error(capsys, *QUICK, "--arch", "", "--out", str(out))
    assert line == (
        f"sslbench: error: no arch given: name at least one with --arch (valid: {', '.join(ARCHS)})"
    )
    assert "resnet18" in ARCHS and "vit_tiny16" in ARCHS
    line = _error(capsys, *QUICK, "--arch", " , ")
    assert line.startswith("sslbench: error: no arch given")
    assert list(tmp_path.iterdir()) == []


# --- an --out that cannot hold a run ------------------------------------------------------------------------


def test_out_that_is_a_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    line = _error(capsys, *QUICK, "--out", str(notes))
    assert line == (
        f"sslbench: error: --out {notes} is a file, not a folder: give a folder for the run (made if missing)"
    )
    assert notes.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_out_below_a_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    out = notes / "runs" / "first"
    line = _error(capsys, *QUICK, "--out", str(out))
    assert line == f"sslbench: error: --out {out}: {notes} is a file, so no folder can be made under it"
    assert notes.is_file() and notes.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any folder: os.access always says yes")
def test_out_in_a_read_only_folder(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked / "run"
    locked.chmod(0o555)
    try:
        line = _error(capsys, *QUICK, "--out", str(out))
        assert line == (
            f"sslbench: error: --out {out}: no permission to write in {locked}; choose a folder you can write"
        )
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_out_in_a_folder_without_write_permission_simulated(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The same refusal as root, where the permission bits do not stop a write: ``os.access`` says no
    for that one folder only."""
    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked / "run"
    real_access = os.access

    def access(path: str | os.PathLike[str], mode: int, *args: object, **kwargs: object) -> bool:
        if Path(path) == locked and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)
    line = _error(capsys, *QUICK, "--out", str(out))
    assert line == (
        f"sslbench: error: --out {out}: no permission to write in {locked}; choose a folder you can write"
    )
    assert list(locked.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["locked"]


# --- --resume with nothing to resume ------------------------------------------------------------------------


def test_resume_a_folder_that_does_not_exist(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "results" / "typo"
    line = _error(capsys, *QUICK, "--resume", "--out", str(missing))
    assert line == (
        f"sslbench: error: nothing to resume: {missing} does not exist. Check the path, or drop --resume "
        "to start a new run there"
    )
    assert list(tmp_path.iterdir()) == []  # neither the folder nor results/ was made


@pytest.mark.parametrize("content", [{}, {"notes.txt": b"my notes\n"}, {"sub/a.txt": b"x"}])
def test_resume_a_folder_that_holds_no_run(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    content: dict[str, bytes],
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, data in content.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    before = _snapshot(tmp_path)
    line = _error(capsys, *QUICK, "--resume", "--out", str(folder))
    assert line == (
        f"sslbench: error: nothing to resume: {folder} holds no run (no config.yaml or eval.json). Check the "
        "path, or drop --resume to start a new run there"
    )
    assert _snapshot(tmp_path) == before  # no .lock, no config.yaml, nothing else


# --- a tiny ImageFolder tree whose training images cannot be read -------------------------------------------


def _tree_with_one_bad_class(root: Path) -> Path:
    """Class a's only training image is a cut-off JPEG; class b has one readable one. Returns the bad file."""
    _png(root / "train" / "b" / "00.png", seed=1)
    for c, cls in enumerate(("a", "b")):
        _png(root / "val" / cls / "00.png", seed=c)
    bad = root / "train" / "a" / "cut.jpg"
    bad.parent.mkdir()
    whole = _jpeg_bytes()
    bad.write_bytes(whole[: len(whole) * 2 // 3])
    return bad


def test_batch_check_names_the_unreadable_images(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A batch larger than the set asks which images decode: the file is named, not --batch-size."""
    monkeypatch.chdir(tmp_path)
    bad = _tree_with_one_bad_class(tmp_path / "data")
    out = tmp_path / "out"
    line = _error(capsys, "--methods", "dino", *TINY_TRAIN, "--dataset", f"imagefolder:{tmp_path / 'data'}",
                  "--set", "image_size=32", "--out", str(out))  # fmt: skip
    assert line.startswith(
        "sslbench: error: batch size 8 is larger than the training set of dino-resnet18: 2 images, of which "
        f"1 cannot be read ({bad} (image file is truncated"
    )
    # both fixes named, so following one does not lead into the other's error
    assert line.endswith(
        "Replace or remove those (--set bad_images=skip leaves them out), and lower --batch-size to 1 or less"
    )
    assert "00.png" not in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_tree_whose_only_training_image_is_unreadable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The user's case: not "the batch is larger than 1 image" but which file cannot be read."""
    monkeypatch.chdir(tmp_path)
    bad = _tree_with_one_bad_class(tmp_path / "data")
    (tmp_path / "data" / "train" / "b" / "00.png").unlink()
    (tmp_path / "data" / "train" / "b").rmdir()
    (tmp_path / "data" / "val" / "b" / "00.png").unlink()
    (tmp_path / "data" / "val" / "b").rmdir()
    out = tmp_path / "out"
    line = _error(capsys, "--methods", "dino", *TINY_TRAIN, "--dataset", f"imagefolder:{tmp_path / 'data'}",
                  "--set", "image_size=32", "--out", str(out))  # fmt: skip
    assert line.startswith(
        f"sslbench: error: none of the 1 training image(s) of dino-resnet18 can be read: {bad} (image file is"
    )
    assert line.endswith("Replace them, or point --dataset at the right folder")
    assert "batch size" not in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_skipping_the_only_image_of_a_class_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    bad = _tree_with_one_bad_class(tmp_path / "data")
    out, data = tmp_path / "out", f"imagefolder:{tmp_path / 'data'}"
    with pytest.warns(UserWarning, match=f"skipped 1 unreadable image file.*{re.escape(str(bad))}"):
        line = _error(capsys, "--methods", "dino", *TINY_TRAIN, "--dataset", data, "--set", "image_size=32",
                      "--set", "bad_images=skip", "--out", str(out))  # fmt: skip
    assert f"{tmp_path / 'data' / 'train'}: class folders ['a'] hold no readable images" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# --- listing a plugin file ----------------------------------------------------------------------------------

TINY_PLUGIN = """\
from sslbench import Method, register_method, two_views


@register_method("tinyssl")
class TinySSL(Method):
    def view_recipe(self):
        return two_views()

    def training_step(self, views, labels, step):
        raise NotImplementedError
"""


def test_list_shows_a_plugin_files_method_and_where_it_came_from(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, isolated_registry: None
) -> None:
    plugin = tmp_path / "tiny.py"
    plugin.write_text(TINY_PLUGIN)
    assert main(["list", "--plugin", str(plugin)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    listed = f"  {'tinyssl':<12} plugin file {plugin}"
    assert lines.index("methods:") < lines.index(listed) < lines.index("archs:")
    assert all(any(line.split() and line.split()[0] == name for line in lines) for name in BUILT_IN_METHODS)
    assert captured.err == ""


def test_list_with_a_missing_plugin_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, isolated_registry: None
) -> None:
    missing = tmp_path / "nowhere.py"
    assert main(["list", "--plugin", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"sslbench: error: plugin file not found: {missing} (give the path of a .py file that uses "
        "@register_method)\n"
    )
    assert captured.out == "" and not missing.exists()


# --- one line per pair --------------------------------------------------------------------------------------


def _pair_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("sslbench: [")]


def test_a_run_of_two_pairs_says_how_far_it_is(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Then a resume of the finished run keeps both pairs and says so, pair by pair."""
    out = tmp_path / "out"
    code, stderr = _run(capsys, *PROGRESS, "--arch", "resnet18,vit_tiny16", "--out", str(out))
    assert code == 0 and "Traceback" not in stderr
    first, second = _pair_lines(stderr)
    assert first == "sslbench: [1/2] random-resnet18: estimate after the first pair"
    assert re.fullmatch(
        r"sslbench: \[2/2\] random-vit_tiny16: about \d+ s left for the run \(1 pair\(s\) to go\)", second
    ), second
    code, stderr = _run(capsys, *PROGRESS, "--arch", "resnet18,vit_tiny16", "--out", str(out), "--resume")
    assert code == 0 and "Traceback" not in stderr
    assert _pair_lines(stderr) == [
        "sslbench: [1/2] random-resnet18: finished before, kept",
        "sslbench: [2/2] random-vit_tiny16: finished before, kept",
    ]


def test_no_progress_prints_no_pair_lines(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, stderr = _run(capsys, *QUICK, "--out", str(tmp_path / "out"))
    assert code == 0 and "Traceback" not in stderr
    assert _pair_lines(stderr) == [] and "sslbench: [" not in stderr


def test_run_progress_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    """The mean pair time so far times the pairs left, the starting one included; minutes from 120 s.
    Two pairs of 60 s and 120 s, pair 3 of 5 starting: 90 s x 3 = 270 s = 4.5 min, printed by
    ``{:.0f}`` (round half to even) as 4 min."""
    progress = RunProgress(5, show=True)
    progress.start("a")
    progress.finish(60.0)
    progress.start("b")
    progress.finish(120.0)
    progress.start("c")
    progress.finish(30.0)  # mean 70 s
    progress.start("d")  # 70 s x 2 = 140 s
    progress.finish(10.0)  # mean 55 s
    progress.start("e")  # 55 s x 1
    assert capsys.readouterr().err.splitlines() == [
        "sslbench: [1/5] a: estimate after the first pair",
        "sslbench: [2/5] b: about 4 min left for the run (4 pair(s) to go)",  # 60 s x 4
        "sslbench: [3/5] c: about 4 min left for the run (3 pair(s) to go)",
        "sslbench: [4/5] d: about 2 min left for the run (2 pair(s) to go)",
        "sslbench: [5/5] e: about 55 s left for the run (1 pair(s) to go)",
    ]


def test_run_progress_skip_and_silence(capsys: pytest.CaptureFixture[str]) -> None:
    progress = RunProgress(3, show=True)
    progress.skip("random-resnet18")
    progress.start("dino-resnet18")  # nothing timed yet: a kept pair says nothing about the time
    progress.finish(10.0)
    progress.start("byol-resnet18")
    assert capsys.readouterr().err.splitlines() == [
        "sslbench: [1/3] random-resnet18: finished before, kept",
        "sslbench: [2/3] dino-resnet18: estimate after the first pair",
        "sslbench: [3/3] byol-resnet18: about 10 s left for the run (1 pair(s) to go)",
    ]
    quiet = RunProgress(2, show=False)
    quiet.skip("a")
    quiet.start("b")
    assert capsys.readouterr().err == ""


# --- the command that resumes an interrupted run ------------------------------------------------------------


def test_resume_command_replaces_out_and_force() -> None:
    argv = ["run", "--methods", "dino", "--out", "old", "--force", "--set", "a=b c"]
    command = resume_command(argv, Path("results/x"))
    assert command == "sslbench run --methods dino --set 'a=b c' --out results/x --resume"
    assert shlex.split(command) == [
        "sslbench", "run", "--methods", "dino", "--set", "a=b c", "--out", "results/x", "--resume"
    ]  # fmt: skip
    args = build_parser().parse_args(shlex.split(command)[1:])  # a command the parser takes as it is
    assert (args.out, args.resume, args.force, args.assignments) == ("results/x", True, False, ["a=b c"])


def test_resume_command_drops_out_equals_and_an_earlier_resume() -> None:
    argv = ["run", "--out=old", "--resume", "--arch", "resnet18", "--resume"]
    assert resume_command(argv, Path("results/x")) == "sslbench run --arch resnet18 --out results/x --resume"
    spaced = resume_command(["ablate", "dino", "--vary", "dino.teacher_temp=0.04,0.07"], Path("my runs/a"))
    assert spaced == "sslbench ablate dino --vary dino.teacher_temp=0.04,0.07 --out 'my runs/a' --resume"


def test_abbreviated_options_are_refused_so_a_resume_command_means_what_was_typed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """argparse would take --forc for --force; the printed resume command drops --force only by its name."""
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["run", "--methods", "random", "--forc", "--out", "old"])
    assert stopped.value.code == 2 and "unrecognized arguments: --forc" in capsys.readouterr().err
    command = resume_command(["run", "--methods", "random", "--force", "--out", "old"], Path("results/x"))
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.resume, args.force, args.out) == (True, False, "results/x")


def test_the_resume_command_under_torchrun_relaunches_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run started by torchrun must not be resumed in one process with the whole global batch."""
    from sslbench.cli import launcher

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert launcher() == ["sslbench"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    prefix = launcher()
    assert prefix == ["torchrun", "--nproc_per_node=8", "-m", "sslbench"]
    command = resume_command(["run", "--methods", "dino"], Path("results/x"), prefix)
    assert command == "torchrun --nproc_per_node=8 -m sslbench run --methods dino --out results/x --resume"


def test_an_out_path_the_system_refuses_to_look_at_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """pathlib lets some errors through (a name too long, no permission to look): still one line."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / ("x" * 300) / "run"
    line = _error(capsys, *QUICK, "--out", str(out))
    assert line.startswith(f"sslbench: error: --out {out}: File name too long; choose another folder")
    assert sorted(tmp_path.iterdir()) == []
