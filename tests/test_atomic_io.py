"""Atomic writes: the target is replaced whole or not at all, with ordinary file permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest

from sslbench.atomic_io import atomic_path, write_json_atomic, write_text_atomic


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
