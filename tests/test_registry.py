"""Method registry: the decorator, entry-point discovery, plugin files, and a real third-party package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from sslbench import Method, SSLBenchError
from sslbench.method import registry
from sslbench.method.registry import (
    ENTRY_POINT_GROUP,
    get_method,
    list_methods,
    load_plugin_file,
    register_method,
)

BUILT_INS = {
    "dino": "sslbench_methods.dino",
    "byol": "sslbench_methods.byol",
    "simclr": "sslbench_methods.simclr",
    "supervised": "sslbench_methods.supervised",
    "random": "sslbench_methods.random_init",
}
TINY_RUN = [
    "--epochs", "1", "--batch-size", "8", "--no-progress",
    "--set", "train.train_per_class=2", "--set", "eval.train_per_class=3", "--set", "eval.test_per_class=2",
    "--set", "eval.monitor_bank_per_class=2", "--set", "eval.monitor_test_per_class=1",
    "--set", "eval.linear_epochs=2", "--set", "train.warmup_epochs=0",
]  # fmt: skip


@pytest.fixture
def clean_modules():
    """Names of modules a test imports; they are dropped from sys.modules afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        sys.modules.pop(name, None)


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --- the decorator -----------------------------------------------------------------------------------


def test_decorator_registers_and_names_the_class(isolated_registry: None) -> None:
    @register_method("my_method2")
    class Mine(Method):
        pass

    assert Mine.name == "my_method2"
    assert get_method("my_method2") is Mine
    assert list_methods()["my_method2"] == f"module {Mine.__module__}"


def test_decorator_rejects_a_class_that_is_not_a_method(isolated_registry: None) -> None:
    with pytest.raises(TypeError, match="subclass of sslbench.Method"):
        register_method("notamethod")(dict)
    with pytest.raises(TypeError):
        register_method("notaclass")(lambda: None)  # type: ignore[arg-type]
    assert "notamethod" not in registry._methods


@pytest.mark.parametrize("name", ["train", "eval", "methods", "archs", "has space", "dash-name", ""])
def test_decorator_rejects_reserved_and_malformed_names(isolated_registry: None, name: str) -> None:
    with pytest.raises(SSLBenchError, match="not allowed"):

        @register_method(name)
        class Mine(Method):
            pass

    assert name not in registry._methods


def test_two_classes_under_one_name_is_an_error(isolated_registry: None) -> None:
    @register_method("twice")
    class First(Method):
        pass

    with pytest.raises(SSLBenchError, match="registered twice"):

        @register_method("twice")
        class Second(Method):
            pass

    assert get_method("twice") is First


def test_registering_the_same_class_again_is_harmless(isolated_registry: None) -> None:
    class Mine(Method):
        pass

    register_method("again")(Mine)
    register_method("again")(Mine)
    assert get_method("again") is Mine


def test_same_class_name_from_another_module_is_an_error(isolated_registry: None) -> None:
    original = get_method("dino")
    impostor = type(original.__name__, (Method,), {"__module__": "someone_elses_plugin",
                                                    "__qualname__": original.__qualname__})  # fmt: skip
    with pytest.raises(SSLBenchError, match="registered twice"):
        register_method("dino")(impostor)
    assert get_method("dino") is original


# --- discovery -------------------------------------------------------------------------------------------


def test_built_ins_come_through_entry_points(isolated_registry: None) -> None:
    methods = list_methods()
    for name, module in BUILT_INS.items():
        assert methods[name] == f"built-in ({module})"
        assert get_method(name).name == name
        assert get_method(name).__module__ == module
    assert list(methods) == sorted(methods)


def test_unknown_method_lists_the_known_ones_and_suggests_the_close_one(isolated_registry: None) -> None:
    with pytest.raises(SSLBenchError) as caught:
        get_method("dnio")
    message = str(caught.value)
    assert "unknown method 'dnio'" in message
    assert "did you mean 'dino'?" in message
    for name in BUILT_INS:
        assert name in message


def test_a_broken_plugin_is_reported_and_the_others_still_work(
    isolated_registry: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clean_modules: list[str]
) -> None:
    _write(tmp_path / "sslbench_test_broken_plugin.py", 'raise ImportError("needs libfoo")\n')
    _write(
        tmp_path / "sslbench_test_good_plugin.py",
        """\
        from sslbench import Method, register_method


        @register_method("goodplugin")
        class Good(Method):
            pass
        """,
    )
    clean_modules += ["sslbench_test_broken_plugin", "sslbench_test_good_plugin"]
    monkeypatch.syspath_prepend(str(tmp_path))
    points = [
        EntryPoint("broken", "sslbench_test_broken_plugin", ENTRY_POINT_GROUP),
        EntryPoint("goodplugin", "sslbench_test_good_plugin", ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: points if group == ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_discovered", False)

    with pytest.warns(UserWarning, match="plugin 'broken'.*ImportError: needs libfoo"):
        methods = list_methods()
    assert "broken" not in methods
    assert "sslbench_test_good_plugin" in methods["goodplugin"]
    assert get_method("goodplugin").name == "goodplugin"
    assert get_method("dino").name == "dino"


def test_an_entry_point_may_name_the_class_itself(
    isolated_registry: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clean_modules: list[str]
) -> None:
    _write(
        tmp_path / "sslbench_test_class_plugin.py",
        """\
        from sslbench import Method


        class Undecorated(Method):
            pass
        """,
    )
    clean_modules.append("sslbench_test_class_plugin")
    monkeypatch.syspath_prepend(str(tmp_path))
    point = EntryPoint("byclass", "sslbench_test_class_plugin:Undecorated", ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [point])
    monkeypatch.setattr(registry, "_discovered", False)
    cls = get_method("byclass")
    assert cls.__name__ == "Undecorated"
    assert cls.name == "byclass"


# --- plugin files -----------------------------------------------------------------------------------------


def test_load_plugin_file_registers_and_reports_the_file(isolated_registry: None, tmp_path: Path) -> None:
    plugin = _write(
        tmp_path / "localplug.py",
        """\
        from sslbench import Method, register_method


        @register_method("localplug")
        class LocalPlug(Method):
            pass
        """,
    )
    assert load_plugin_file(plugin) == ["localplug"]
    assert list_methods()["localplug"] == f"plugin file {plugin}"
    assert get_method("localplug").name == "localplug"


def test_load_plugin_file_missing(isolated_registry: None, tmp_path: Path) -> None:
    missing = tmp_path / "nope.py"
    with pytest.raises(SSLBenchError, match="plugin file not found") as caught:
        load_plugin_file(missing)
    assert str(missing) in str(caught.value)


def test_load_plugin_file_that_raises_names_the_file(isolated_registry: None, tmp_path: Path) -> None:
    plugin = _write(tmp_path / "raiser.py", "import definitely_not_an_installed_module_xyz\n")
    with pytest.raises(SSLBenchError, match="failed to import: ModuleNotFoundError") as caught:
        load_plugin_file(plugin)
    assert str(plugin) in str(caught.value)


def test_load_plugin_file_that_registers_nothing(isolated_registry: None, tmp_path: Path) -> None:
    plugin = _write(tmp_path / "empty_plugin.py", "VALUE = 1\n")
    with pytest.raises(SSLBenchError, match="registered no method") as caught:
        load_plugin_file(plugin)
    assert str(plugin) in str(caught.value)


# --- a real third-party package, found through its dist-info ------------------------------------------------

MY_METHOD = '''\
"""A SimCLR-like method shipped by a third-party package."""

from dataclasses import dataclass

from sslbench import MLPHead, Method, StepOutput, multicrop_forward, nt_xent_loss, register_method, two_views


@dataclass
class MyConfig:
    proj_hidden_dim: int = 32
    proj_dim: int = 16
    temperature: float = 0.5


@register_method("mymethod")
class MyMethod(Method):
    Config = MyConfig

    def __init__(self, backbone, config, context):
        super().__init__(backbone, config, context)
        self.projector = MLPHead(backbone.feat_dim, config.proj_hidden_dim, config.proj_dim)

    def view_recipe(self):
        return two_views()

    def training_step(self, views, labels, step):
        z1, z2 = multicrop_forward(self.backbone, views, self.projector)
        return StepOutput(nt_xent_loss(z1, z2, self.config.temperature))
'''


def _sslbench(args: list[str], cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sslbench", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_third_party_package_end_to_end(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "my_ssl_method.py").write_text(MY_METHOD, encoding="utf-8")
    dist_info = site / "my_ssl_method-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-ssl-method\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nmymethod = my_ssl_method\n")

    listed = _sslbench(["list"], tmp_path, site)
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.strip().startswith("mymethod"))
    assert "package my-ssl-method (my_ssl_method)" in line
    assert "built-in (sslbench_methods.dino)" in listed.stdout

    out = tmp_path / "out"
    ran = _sslbench(["run", "--methods", "mymethod", "--arch", "resnet18", *TINY_RUN,
                     "--set", "mymethod.proj_dim=8", "--out", str(out)], tmp_path, site)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "Traceback" not in ran.stderr
    record = json.loads((out / "mymethod-resnet18" / "eval.json").read_text())
    assert record["status"] == "ok"
    assert record["method_source"] == "package my-ssl-method (my_ssl_method)"
    assert record["method_options"] == {"proj_hidden_dim": 32, "proj_dim": 8, "temperature": 0.5}
    assert set(record["knn"]) == {"10", "20", "100", "200"}
    assert all(0.0 <= value <= 100.0 for value in record["knn"].values())
    assert 0.0 <= record["linear"]["top1"] <= 100.0
    assert (out / "mymethod-resnet18" / "metrics.jsonl").is_file()
    assert "mymethod" in (out / "table.md").read_text()


def test_a_method_built_on_another_loads_it_first_and_both_keep_their_source():
    """dinov2 subclasses ibot through get_method while the entry points (in name order) are imported."""
    from sslbench.method.registry import get_method, list_methods

    sources = list_methods()
    assert sources["ibot"] == "built-in (sslbench_methods.ibot)"
    assert sources["dinov2"] == "built-in (sslbench_methods.dinov2)"
    assert issubclass(get_method("dinov2"), get_method("ibot"))
