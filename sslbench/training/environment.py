"""What a run ran on, saved beside its results: numbers are only comparable with their environment."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("sslbench", "torch", "torchvision", "timm", "numpy", "pandas", "pillow")
_scheduler_job: dict[str, Any] = {}  # set by a scheduled job (``sslbench submit``) before its run starts


def record_scheduler_job(job: dict[str, Any]) -> None:
    """The scheduler's job this process runs in (id, attempt, log files): saved in environment.json, so a
    run's numbers lead back to the job and its logs. An empty dict clears it."""
    _scheduler_job.clear()
    _scheduler_job.update(job)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(path: Path) -> str | None:
    """The commit of the checkout sslbench runs from (None outside one); '+dirty' marks local changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=path, capture_output=True, text=True, timeout=5
        )
        return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def describe_environment(device: torch.device, seed: int) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "command": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": gpu,
        "seed": seed,
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": git_commit(Path(__file__).resolve().parent),
    } | ({"job": dict(_scheduler_job)} if _scheduler_job else {})
