"""What a new user runs into first: an empty --methods or --arch, an --out that cannot hold a run, a
--resume with nothing to resume, a tiny ImageFolder tree with unreadable images, a plugin file to list.
(What a run says while it runs and when it stops is in test_run_messages.py.)

Every refusal is one line, status 2, no traceback, and leaves nothing on disk. Runs go through
``main(argv)`` in this process with the ``random`` method (nothing to train) or a check that fires before
training, so the file stays fast.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from test_bad_input import BUILT_IN_METHODS, QUICK, TINY_TRAIN, _error, _jpeg_bytes, _png

from sslbench.cli import main
from sslbench.models.backbones import ARCHS


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


def test_an_out_path_the_system_refuses_to_look_at_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """pathlib lets some errors through (a name too long, no permission to look): still one line."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / ("x" * 300) / "run"
    line = _error(capsys, *QUICK, "--out", str(out))
    assert line.startswith(f"sslbench: error: --out {out}: File name too long; choose another folder")
    assert sorted(tmp_path.iterdir()) == []


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
    listed = f"  {'tinyssl':<13} no paper given; plugin file {plugin}"
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
