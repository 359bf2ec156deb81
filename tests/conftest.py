"""Shared fixtures."""

from __future__ import annotations

import sys
from collections.abc import Iterator

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
