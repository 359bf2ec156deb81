"""Name -> Method class, filled by a decorator and discovered through entry points.

Built-in methods and third-party packages register the same way: a module listed in the
``sslbench.methods`` entry-point group whose import runs ``@register_method``. A local file can be
loaded with ``load_plugin_file``. Discovery is lazy, and a plugin that fails to import is reported by
name without breaking the others.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import sys
import warnings
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from sslbench.base.errors import SSLBenchError, unknown_name_message
from sslbench.config import RunConfig
from sslbench.method import Method

ENTRY_POINT_GROUP = "sslbench.methods"
# Method sections sit beside the run's own keys in a config, so a method may not take one of their names.
RESERVED_NAMES = frozenset(f.name for f in dataclasses.fields(RunConfig)) | {"method_options"}

_methods: dict[str, type[Method]] = {}
_sources: dict[str, str] = {}
_failed: dict[str, str] = {}  # entry-point name -> why its plugin did not import, for get_method's message
_discovered = False
_pending: dict[str, EntryPoint] = {}  # entry points not yet imported, while discovery runs
_credited: set[str] = set()  # methods whose source an entry point has already given


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``@register_method("byol")``."""

    def decorator(cls: type[Method]) -> type[Method]:
        if not (inspect.isclass(cls) and issubclass(cls, Method)):
            raise TypeError(f"@register_method('{name}') must decorate a subclass of sslbench.Method")
        if name in RESERVED_NAMES or not name.replace("_", "").isalnum():
            raise SSLBenchError(
                f"method name '{name}' is not allowed: use letters, digits and '_', "
                f"and none of {', '.join(sorted(RESERVED_NAMES))}"
            )
        existing = _methods.get(name)
        same_class = existing is not None and (existing.__module__, existing.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )
        if existing is not None and not same_class:
            raise SSLBenchError(
                f"method '{name}' is registered twice: by {existing.__module__} and {cls.__module__}"
            )
        cls.name = name
        _methods[name] = cls
        _sources.setdefault(name, f"module {cls.__module__}")
        return cls

    return decorator


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    _pending.update({ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)})
    while _pending:
        _load_entry_point(next(iter(_pending)))


def _load_entry_point(name: str) -> None:
    """Import one plugin's entry point. A method built on another (``get_method("ibot")`` at import time)
    loads that one first, whatever the order the entry points come in."""
    ep = _pending.pop(name)
    before = set(_methods)
    try:
        loaded = ep.load()
    except Exception as error:  # a broken plugin must not break the others
        _failed[ep.name] = f"{ep.value}: {type(error).__name__}: {error}"
        warnings.warn(
            f"method plugin '{ep.name}' ({ep.value}) failed to import and is skipped: "
            f"{type(error).__name__}: {error}",
            stacklevel=3,
        )
        return
    if inspect.isclass(loaded) and issubclass(loaded, Method) and loaded not in _methods.values():
        register_method(ep.name)(loaded)
    dist = ep.dist.name if ep.dist is not None else "unknown package"
    origin = "built-in" if dist == "sslbench" else f"package {dist}"
    for added in set(_methods) - before - _credited:  # one loaded on demand inside keeps its own source
        _sources[added] = f"{origin} ({ep.value})"
        _credited.add(added)


def load_plugin_file(path: str | Path) -> list[str]:
    """Import a local ``.py`` file whose ``@register_method`` calls add methods; return their names."""
    file = Path(path)
    if not file.is_file():
        raise SSLBenchError(
            f"plugin file not found: {file} (give the path of a .py file that uses @register_method)"
        )
    _discover()
    before = set(_methods)
    module_name = f"sslbench_plugin_{file.stem}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None or file.suffix != ".py":
        raise SSLBenchError(f"plugin {file} is not a Python file: give the path of a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SSLBenchError:
        raise
    except Exception as error:
        sys.modules.pop(module_name, None)
        raise SSLBenchError(f"plugin {file} failed to import: {type(error).__name__}: {error}") from error
    added = sorted(set(_methods) - before)
    if not added:
        raise SSLBenchError(
            f"plugin {file} registered no method: decorate a Method subclass with @register_method('name')"
        )
    for name in added:
        _sources[name] = f"plugin file {file}"
    return added


def get_method(name: str) -> type[Method]:
    _discover()
    if name not in _methods and name in _pending:  # asked for while the plugins are being discovered
        _load_entry_point(name)
    if name not in _methods and name in _failed:
        raise SSLBenchError(
            f"method '{name}' is unavailable: its plugin failed to import ({_failed[name]}); fix or "
            "reinstall the package that provides it, or choose another method (sslbench list)"
        )
    if name not in _methods:
        raise SSLBenchError(unknown_name_message("method", name, _methods))
    return _methods[name]


def list_methods() -> dict[str, str]:
    """Registered method names mapped to where each came from."""
    _discover()
    return {name: _sources[name] for name in sorted(_methods)}
