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
    # the package's own dict, not getattr: reading a missing old name would import it (and warn) here
    monkeypatch.setitem(vars(sslbench), old, None)
    monkeypatch.delitem(vars(sslbench), old)


def test_all_has_no_duplicates() -> None:
    duplicates = sorted({name for name in sslbench.__all__ if sslbench.__all__.count(name) > 1})
    assert not duplicates, f"listed twice in sslbench.__all__: {duplicates}"


@pytest.mark.parametrize("name", sslbench.__all__)
def test_every_public_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from sslbench import {name}", namespace)
    assert namespace[name] is getattr(sslbench, name)


def _defined_here(module: object) -> dict[str, object]:
    """The public functions and classes a module defines itself (not the ones it imports)."""
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
    }


@pytest.mark.parametrize(("old", "homes"), sorted(legacy_paths.MOVED.items()))
def test_old_path_gives_the_moved_contents_with_a_warning(
    old: str, homes: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    moved = [importlib.import_module(home) for home in homes]
    _forget(monkeypatch, old)
    with pytest.warns(DeprecationWarning, match=rf"sslbench\.{old} moved to {re.escape(homes[0])}\b"):
        alias = importlib.import_module(f"sslbench.{old}")
    assert sys.modules[f"sslbench.{old}"] is alias
    if len(moved) == 1:  # a module that moved whole: the alias is the module itself
        assert alias is moved[0]
    for module in moved:  # a module that was split: every piece's names, the very same objects
        assert module.__spec__.name == module.__name__  # the alias left the moved module's spec alone
        for name, value in _defined_here(module).items():
            assert getattr(alias, name) is value, f"sslbench.{old}.{name}"


def test_split_modules_answer_the_names_they_held(monkeypatch: pytest.MonkeyPatch) -> None:
    for old in ("distributed", "evaluate", "diagnostics"):
        _forget(monkeypatch, old)
    with pytest.warns(DeprecationWarning):
        from sslbench.diagnostics import DIAGNOSTIC_KEYS, collapse_verdict
        from sslbench.distributed import gather_with_grad, init_distributed
        from sslbench.evaluate import evaluate_method, extract_features, knn_classify, linear_probe
    from sslbench.base import collapse_criteria, collectives
    from sslbench.evaluation import evaluate, features, knn
    from sslbench.evaluation import linear_probe as probe
    from sslbench.evaluation.diagnostics import collapse_verdict as verdict
    from sslbench.training.distributed import init_distributed as init

    assert DIAGNOSTIC_KEYS is collapse_criteria.DIAGNOSTIC_KEYS and collapse_verdict is verdict
    assert gather_with_grad is collectives.gather_with_grad and init_distributed is init
    assert (evaluate_method, extract_features) == (evaluate.evaluate_method, features.extract_features)
    assert (knn_classify, linear_probe) == (knn.knn_classify, probe.linear_probe)


def test_old_modules_are_attributes_of_the_package_and_old_training_names_resolve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flat layout imported some modules eagerly, so ``sslbench.augment.two_views`` worked after a
    bare ``import sslbench``; and ``sslbench.training`` was a module with the loop in it."""
    _forget(monkeypatch, "augment")
    with pytest.warns(DeprecationWarning, match=r"sslbench\.augment moved"):
        assert sslbench.augment.two_views is sslbench.two_views
    with pytest.raises(AttributeError):
        _ = sslbench.no_such_module
    from sslbench.training import loop, step

    with pytest.warns(DeprecationWarning, match=r"sslbench\.training\.(train_loop|optimization_step) moved"):
        from sslbench.training import optimization_step, train_loop
    assert train_loop is loop.train_loop and optimization_step is step.optimization_step


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
