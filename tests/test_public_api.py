"""The public API a plugin is written against: ``sslbench.__all__``, and the old flat import paths.

Plugins import ``from sslbench import ...``; ones written before the parts had folders import from
paths such as ``sslbench.augment``. Both must keep giving the very same objects, or a plugin's classes
and the runner's would differ (isinstance checks, registries, EMA updates).
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import sslbench
from sslbench import legacy_paths
from sslbench.method import registry

ROOT = Path(__file__).resolve().parents[1]


def _forget(monkeypatch: pytest.MonkeyPatch, old: str) -> None:
    """Drop the alias ``sslbench.<old>`` so the next import finds it afresh (and warns); both the module
    and the package attribute come back as they were after the test, so no alias outlives it."""
    name = f"sslbench.{old}"
    # setitem/setattr first so the undo also removes what the import under test adds
    monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sslbench, old, None, raising=False)
    monkeypatch.delattr(sslbench, old, raising=False)


def test_all_has_no_duplicates() -> None:
    duplicates = sorted({name for name in sslbench.__all__ if sslbench.__all__.count(name) > 1})
    assert not duplicates, f"listed twice in sslbench.__all__: {duplicates}"


@pytest.mark.parametrize("name", sslbench.__all__)
def test_every_public_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from sslbench import {name}", namespace)
    assert namespace[name] is getattr(sslbench, name)


@pytest.mark.parametrize(("old", "new"), sorted(legacy_paths.MOVED.items()))
def test_old_path_is_the_moved_module_with_a_warning(
    old: str, new: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    moved = importlib.import_module(new)
    _forget(monkeypatch, old)
    with pytest.warns(DeprecationWarning, match=rf"sslbench\.{old} moved to {re.escape(new)}\b"):
        alias = importlib.import_module(f"sslbench.{old}")
    assert alias is moved
    assert sys.modules[f"sslbench.{old}"] is moved
    assert moved.__spec__.name == new
    assert moved.__name__ == new


def test_the_paths_plugins_used_before_the_move_give_the_same_objects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _forget(monkeypatch, "augment")
    _forget(monkeypatch, "heads")
    with pytest.warns(DeprecationWarning, match=r"sslbench\.data\.augment"):
        from sslbench.augment import two_views
    with pytest.warns(DeprecationWarning, match=r"sslbench\.models\.heads"):
        from sslbench.heads import MLPHead
    assert two_views is sslbench.two_views
    assert MLPHead is sslbench.MLPHead


def test_importing_sslbench_warns_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import sslbench"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_a_plugin_importing_the_whole_public_api_loads(isolated_registry: None, tmp_path: Path) -> None:
    """Every name of ``__all__`` (not only the few the examples use) reaches a plugin file as the same
    object, with no warning, and the plugin registers."""
    names = "".join(f"    {name},\n" for name in sslbench.__all__)
    plugin = tmp_path / "whole_api.py"
    plugin.write_text(
        f"from sslbench import (\n{names})\n\n\n"
        + textwrap.dedent(
            """\
            @register_method("whole_api")
            class WholeAPI(Method):
                pass
            """
        ),
        encoding="utf-8",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sslbench.load_plugin_file(plugin) == ["whole_api"]
    module = sys.modules["sslbench_plugin_whole_api"]
    assert sslbench.get_method("whole_api") is module.WholeAPI
    assert issubclass(module.WholeAPI, sslbench.Method)
    assert registry.list_methods()["whole_api"] == f"plugin file {plugin}"
    assert [name for name in sslbench.__all__ if getattr(module, name) is not getattr(sslbench, name)] == []


def _readme_section(title: str) -> str:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(title)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end])


def test_readme_adding_a_method_names_every_public_name() -> None:
    section = _readme_section("## Adding a method")
    missing = [name for name in sslbench.__all__ if f"`{name}`" not in section]
    assert not missing, f"README.md's '## Adding a method' does not name (in backticks): {missing}"
