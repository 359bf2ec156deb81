"""Atomic writes: the target is replaced whole or not at all, with ordinary file permissions; a full disk
is one message that names the file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat

import pytest

from sslbench.base import atomic_io
from sslbench.base.atomic_io import atomic_path, write_json_atomic, write_text_atomic
from sslbench.base.errors import SSLBenchError


def test_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "deep" / "eval.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"b": 2})
    assert json.loads(target.read_text()) == {"b": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["eval.json"]


def test_a_failure_inside_the_block_keeps_the_old_file(tmp_path):
    target = tmp_path / "table.md"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk gone")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_written_files_follow_the_umask_not_private_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "summary.csv", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "summary.csv").stat().st_mode) == 0o644


def _no_space(*_args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


FULL_DISK = "no space left on the device while writing {}: free some space or write elsewhere (--out)"


def test_a_full_disk_at_fsync_is_one_message_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "eval.json"
    write_json_atomic(target, {"old": 1})
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(SSLBenchError) as caught:
        write_json_atomic(target, {"new": 2})
    assert str(caught.value).startswith(FULL_DISK.format(target))
    assert "the previous version of the file, if any, is unchanged" in str(caught.value)
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_a_full_disk_while_writing_inside_the_block(tmp_path):
    target = tmp_path / "summary.csv"
    write_text_atomic(target, "old")
    with (
        pytest.raises(SSLBenchError, match="no space left on the device while writing"),
        atomic_path(target) as tmp,
    ):
        tmp.write_text("half")
        _no_space()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_a_full_quota_says_quota(tmp_path, monkeypatch):
    def over_quota(*_args: object) -> None:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "replace", over_quota)
    with pytest.raises(
        SSLBenchError, match=r"^disk quota exceeded while writing .*new\.txt: free some space"
    ):
        write_text_atomic(tmp_path / "new.txt", "x")
    assert list(tmp_path.iterdir()) == []


def test_a_writer_that_loses_the_errno_on_a_full_disk(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError without an errno: the free space tells."""
    target = tmp_path / "backbone.pt"
    monkeypatch.setattr(atomic_io.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(100, 100, 4096))
    with pytest.raises(SSLBenchError, match="no space left on the device"), atomic_path(target):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_are_not_called_a_full_disk(tmp_path):
    with pytest.raises(PermissionError), atomic_path(tmp_path / "x.txt"):
        raise PermissionError(errno.EACCES, "Permission denied")
    assert list(tmp_path.iterdir()) == []
