"""The run folder: a unique name, one run at a time in it, and the rules for reusing it.

A folder holds one run. A second run into it is refused unless it resumes that run with the same config
(``--resume``) or starts it over (``--force``). While a run is writing, ``.lock`` names its process;
another run into the folder is refused with that name, and a lock left by a process that no longer
exists on this machine is taken over with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from sslbench.errors import SSLBenchError

LOCK_NAME = ".lock"
RESTART_MODES = ("new", "resume", "force")
# Keys that may differ on a resume: where the results go and which device trains do not change a number.
RESUMABLE_CHANGES = frozenset({"out", "device"})


def new_run_dir(root: Path, stem: str) -> Path:
    """``root/stem``, or ``root/stem-2``, ``-3``...: created here, so two runs never share one."""
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = root / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise SSLBenchError(f"could not create a new run folder under {root}: give one with --out")


def default_run_dir(preset: str) -> Path:
    return new_run_dir(Path("results"), f"{datetime.now():%Y%m%d-%H%M%S}-{preset}")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat |= _flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every key that differs (``RESUMABLE_CHANGES`` aside)."""
    old, new = _flatten(saved), _flatten(current)
    keys = sorted(k for k in old.keys() | new.keys() if k.split(".")[0] not in RESUMABLE_CHANGES)
    return [
        f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in keys if old.get(k) != new.get(k)
    ]


def holds_a_run(out_dir: Path) -> bool:
    return (out_dir / "config.yaml").exists() or any(out_dir.glob("*/eval.json"))


def check_reuse(out_dir: Path, current: dict[str, Any], restart: str) -> None:
    """Refuse to mix two runs in one folder; for ``force``, empty the old run out of it first."""
    if restart not in RESTART_MODES:
        raise ValueError(f"restart must be one of {RESTART_MODES}, got {restart!r}")
    if not out_dir.is_dir() or not holds_a_run(out_dir):
        return
    if restart == "new":
        raise SSLBenchError(
            f"results folder {out_dir} already holds a run: add --resume to continue it, --force to start "
            "it over, or give another --out"
        )
    if restart == "force":
        for entry in out_dir.iterdir():
            if entry.name == LOCK_NAME:
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return
    saved_path = out_dir / "config.yaml"
    if not saved_path.exists():
        raise SSLBenchError(f"{out_dir} has no config.yaml to resume from: use --force to start it over")
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    differences = config_differences(saved, current)
    if differences:
        raise SSLBenchError(
            f"cannot resume {out_dir}: its config differs in {'; '.join(differences)}. Resume with the "
            "same config, or use --force to start it over"
        )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class RunLock:
    """``.lock`` in the run folder for as long as the run writes there (a context manager)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_NAME
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now().isoformat()}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(self.owner, handle)
        return True

    def acquire(self) -> RunLock:
        if self._create():
            return self
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        if isinstance(pid, int) and host == self.owner["host"] and not _process_alive(pid):
            warnings.warn(
                f"{self.path} was left by process {pid}, which has ended; taking it over", stacklevel=2
            )
            self.path.unlink(missing_ok=True)
            if self._create():
                return self
        raise SSLBenchError(
            f"results folder {self.path.parent} is in use by process {pid} on {host} since "
            f"{holder.get('since', '?')}: wait for it to finish or give another --out (if that process "
            f"is gone, remove {self.path})"
        )

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
