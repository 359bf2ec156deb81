"""The command line run in this process, as the CLI tests drive it."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from sslbench.cli import main


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run ``sslbench ARGV`` in this process; return (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def read_eval(folder: Path, pair: str) -> dict[str, Any]:
    """A pair's eval.json in a run folder."""
    return json.loads((folder / pair / "eval.json").read_text(encoding="utf-8"))
