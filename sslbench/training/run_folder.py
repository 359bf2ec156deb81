"""The run folder: a unique name, one run at a time in it, and the rules for reusing it.

A folder holds one run. A second run into it is refused unless it resumes that run with the same config
(``--resume``) or starts it over (``--force``). While a run is writing, it holds a lock on ``.lock``,
which names its process; another run into the folder is refused with that name. The lock ends with
the process, however it ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from sslbench.base.atomic_io import make_folder, write_json_atomic, write_text_atomic
from sslbench.base.errors import SSLBenchError
from sslbench.config import RunConfig, config_to_dict

LOCK_NAME = ".lock"
RESTART_MODES = ("new", "resume", "force")
# Keys that may differ on a resume: where the results go does not change a number. (The machine does:
# precision "auto" resolves per device and CPU, and a checkpoint's hash holds the resolved precision.)
RESUMABLE_CHANGES = frozenset({"out"})
# What a run writes at its top level; --force removes these and the pair folders, nothing else.
RUN_FILES = frozenset(
    {"config.yaml", "environment.json", "summary.csv", "summary.png", "table.md", "table.tex",
     "curves.png", "collapse.png", "ablation.md", "ablation.csv"}
)  # fmt: skip
PAIR_MARKERS = ("eval.json", "metrics.jsonl", "checkpoints", "backbone.pt", "traceback.txt")


def new_run_dir(root: Path, stem: str) -> Path:
    """``root/stem``, or ``root/stem-2``, ``-3``...: created here, so two runs never share one."""
    make_folder(root, "results folder")
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


def check_out_dir(out: str | None, restart: str) -> None:
    """What ``--out`` names must be able to hold a run, checked before anything trains or is written:
    a folder (or a path one can be made at) that this user may write, and for ``--resume``, a run."""
    if out is None:
        if restart != "new":  # the command line asks for --out first; this holds for direct callers
            raise SSLBenchError(f"--{restart} needs the run folder: add --out PATH")
        return
    try:
        _check_out_path(Path(out), out, restart)
    except OSError as error:  # a folder we may not look into, a name too long: one line all the same
        raise SSLBenchError(f"--out {out}: {error.strerror or error}; choose another folder") from error


def _check_out_path(path: Path, out: str, restart: str) -> None:
    if path.exists() and not path.is_dir():
        raise SSLBenchError(
            f"--out {out} is a file, not a folder: give a folder for the run (made if missing)"
        )
    if restart == "resume" and not (path.is_dir() and holds_a_run(path)):
        where = "does not exist" if not path.exists() else "holds no run (no config.yaml or eval.json)"
        raise SSLBenchError(
            f"nothing to resume: {out} {where}. Check the path, or drop --resume to start a new run there"
        )
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise SSLBenchError(f"--out {out}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SSLBenchError(
            f"--out {out}: no permission to write in {existing}; choose a folder you can write"
        )


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
    if restart == "force":  # only what a run wrote: a folder given by mistake keeps everything else
        for entry in out_dir.iterdir():
            if entry.is_file() and entry.name in RUN_FILES:
                entry.unlink()
            elif entry.is_dir() and any((entry / marker).exists() for marker in PAIR_MARKERS):
                shutil.rmtree(entry)
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


def prepare_out_dir(config: RunConfig, restart: str, environment: dict[str, Any]) -> tuple[Path, RunLock]:
    """The run folder (a new unique one by default), locked first, then checked for reuse, with the
    config and ``environment`` (what runs it) saved in it. Nothing in a folder another run holds is
    touched."""
    out_dir = make_folder(config.out, "run folder") if config.out else default_run_dir(config.preset)
    lock = RunLock(out_dir).acquire()
    try:
        check_reuse(out_dir, config_to_dict(config), restart)
        write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
        write_json_atomic(out_dir / "environment.json", environment | {"run_id": out_dir.name})
    except BaseException:
        lock.release()
        raise
    return out_dir, lock


class RunLock:
    """An exclusive ``flock`` on ``.lock`` in the run folder for as long as the run writes there.

    The operating system drops the lock when the process ends, however it ends, so a killed run never
    leaves a folder locked. The file names the holder, for the message another run gets.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_NAME
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now().isoformat()}
        self.handle: Any = None

    def acquire(self) -> RunLock:
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "{}")
            except ValueError:
                holder = {}
            handle.close()
            raise SSLBenchError(
                f"results folder {self.path.parent} is in use by process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} since {holder.get('since', '?')}: wait for it to finish or "
                "give another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        json.dump(self.owner, handle)
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
