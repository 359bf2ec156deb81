"""Shared fixtures."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sslbench.method import registry


@pytest.fixture(scope="session", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread for every test: on a few shared cores the many tiny ops of a small model run
    much faster without thread hand-offs, and reductions stay in one fixed order."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Built-ins discovered once, then a private copy of the registry, so no test leaks a registration;
    plugin modules a test loads with --plugin are dropped afterwards."""
    registry.list_methods()
    monkeypatch.setattr(registry, "_methods", dict(registry._methods))
    monkeypatch.setattr(registry, "_sources", dict(registry._sources))
    monkeypatch.setattr(registry, "_failed", dict(registry._failed))
    monkeypatch.setattr(registry, "_discovered", True)
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("sslbench_plugin_"):
            del sys.modules[name]


@pytest.fixture(scope="session")
def uninterrupted_dino_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_resume's tiny DINO run, run whole once: the numbers a killed, signalled or requeued run of the
    same config must end with."""
    from test_resume import RUN, _env

    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = subprocess.run([*RUN, f"--out={out}"], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out
