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

# old module (under sslbench.) -> where it lives now
MOVED = {
    "ablation": "sslbench.training.ablation",
    "atomic_io": "sslbench.base.atomic_io",
    "attention": "sslbench.evaluation.attention",
    "augment": "sslbench.data.augment",
    "backbones": "sslbench.models.backbones",
    "checkpoint": "sslbench.training.checkpoint",
    "datasets": "sslbench.data.datasets",
    "diagnostics": "sslbench.evaluation.diagnostics",
    "distributed": "sslbench.training.distributed",
    "environment": "sslbench.training.environment",
    "errors": "sslbench.base.errors",
    "evaluate": "sslbench.evaluation.evaluate",
    "experiment": "sslbench.training.experiment",
    "gpu_augment": "sslbench.data.gpu_augment",
    "gpu_photometric": "sslbench.data.gpu_photometric",
    "heads": "sslbench.models.heads",
    "image_canvas": "sslbench.data.image_canvas",
    "image_files": "sslbench.data.image_files",
    "momentum": "sslbench.models.momentum",
    "monitor": "sslbench.evaluation.monitor",
    "optim": "sslbench.training.optim",
    "plots": "sslbench.reporting.plots",
    "registry": "sslbench.method.registry",
    "report": "sslbench.reporting.tables",
    "run_folder": "sslbench.training.run_folder",
    "runner": "sslbench.training.runner",
    "sampling": "sslbench.data.sampling",
    "schedules": "sslbench.base.schedules",
}
_PREFIX = "sslbench."


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old path with the moved module; consulted after the ordinary finders."""

    def __init__(self) -> None:
        self._real_specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(self, fullname: str, path: object = None, target: object = None):  # noqa: ANN201
        if fullname.startswith(_PREFIX) and fullname[len(_PREFIX) :] in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new_name = MOVED[spec.name[len(_PREFIX) :]]
        warnings.warn(
            f"{spec.name} moved to {new_name}; import the public names from sslbench instead "
            "(from sslbench import ...; the list is sslbench.__all__)",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new_name)
        self._real_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system stamped the alias's spec on the moved module: give it back its own.
        alias = module.__spec__.name if module.__spec__ is not None else ""
        module.__spec__ = self._real_specs.pop(alias, module.__spec__)


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
