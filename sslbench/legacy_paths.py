"""The import paths of the flat layout (``sslbench.augment``, ``sslbench.heads``, ...), kept working.

Plugins written before the parts had folders import from them. Each old path now names the module
that moved, with a DeprecationWarning that points at the public API (``from sslbench import ...``),
the one place plugins should import from. The alias is the moved module itself, not a copy, so a
class imported either way is the same class.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

# old module (under sslbench.) -> where its contents live now: the first module, and for a module that
# was split, the others that hold the rest of its names
MOVED: dict[str, tuple[str, ...]] = {
    "ablation": ("sslbench.training.ablation",),
    "atomic_io": ("sslbench.base.atomic_io",),
    "attention": ("sslbench.evaluation.attention",),
    "augment": ("sslbench.data.augment",),
    "backbones": ("sslbench.models.backbones",),
    "checkpoint": ("sslbench.training.checkpoint",),
    "datasets": ("sslbench.data.datasets",),
    "diagnostics": ("sslbench.evaluation.diagnostics", "sslbench.base.collapse_criteria"),
    "distributed": ("sslbench.training.distributed", "sslbench.base.collectives"),
    "environment": ("sslbench.training.environment",),
    "errors": ("sslbench.base.errors",),
    "evaluate": (
        "sslbench.evaluation.evaluate",
        "sslbench.evaluation.features",
        "sslbench.evaluation.knn",
        "sslbench.evaluation.linear_probe",
    ),
    "experiment": ("sslbench.training.experiment",),
    "gpu_augment": ("sslbench.data.gpu_augment",),
    "gpu_photometric": ("sslbench.data.gpu_photometric",),
    "heads": ("sslbench.models.heads",),
    "image_canvas": ("sslbench.data.image_canvas",),
    "image_files": ("sslbench.data.image_files",),
    "momentum": ("sslbench.models.momentum",),
    "monitor": ("sslbench.evaluation.monitor",),
    "optim": ("sslbench.training.optim",),
    "plots": ("sslbench.reporting.plots",),
    "presets": ("sslbench.config.presets",),
    "registry": ("sslbench.method.registry",),
    "report": ("sslbench.reporting.tables",),
    "run_folder": ("sslbench.training.run_folder",),
    "runner": ("sslbench.training.runner",),
    "sampling": ("sslbench.data.sampling",),
    "schedules": ("sslbench.base.schedules",),
}
_PREFIX = "sslbench."


class SplitModule(ModuleType):
    """An old module whose names now live in several: each name is looked up in them, in order."""

    def __init__(self, name: str, homes: tuple[ModuleType, ...]) -> None:
        super().__init__(name, f"moved to {', '.join(home.__name__ for home in homes)}")
        self._homes = homes

    def __getattr__(self, attribute: str) -> object:
        for home in self._homes:
            if hasattr(home, attribute):
                return getattr(home, attribute)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attribute!r}")

    def __dir__(self) -> list[str]:
        return sorted({name for home in self._homes for name in dir(home)})


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old path with the moved module (or, for a split one, a view of its parts); consulted
    after the ordinary finders."""

    def __init__(self) -> None:
        self._real_specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(self, fullname: str, path: object = None, target: object = None):  # noqa: ANN201
        if fullname.startswith(_PREFIX) and fullname[len(_PREFIX) :] in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        homes = MOVED[spec.name[len(_PREFIX) :]]
        warnings.warn(
            f"{spec.name} moved to {' and '.join(homes)}; import the public names from sslbench instead "
            "(from sslbench import ...; the list is sslbench.__all__)",
            DeprecationWarning,
            stacklevel=2,
        )
        modules = tuple(importlib.import_module(home) for home in homes)
        if len(modules) > 1:
            return SplitModule(spec.name, modules)
        self._real_specs[spec.name] = modules[0].__spec__
        return modules[0]

    def exec_module(self, module: ModuleType) -> None:
        # The import system stamped the alias's spec on a moved module: give it back its own.
        alias = module.__spec__.name if module.__spec__ is not None else ""
        if alias in self._real_specs:
            module.__spec__ = self._real_specs.pop(alias)


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())


def moved_attribute(name: str) -> ModuleType:
    """``sslbench.<old>`` as an attribute, as the flat layout's eager imports made it available."""
    if name not in MOVED:
        raise AttributeError(f"module 'sslbench' has no attribute {name!r}")
    return importlib.import_module(_PREFIX + name)
