"""The parts of sslbench import each other in one direction only, checked from the source with ``ast``.

A part that reaches up (data importing training, reporting importing torch) couples pieces that must
change and load alone; these tests name the file, line and import, and what that part may import, so the
fix is obvious. Nothing under test is imported here: the rules hold for the files as written.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser under its backport name
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sslbench"

# part -> the other parts it may import (its own modules are always fine; the face never is)
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "config": {"base"},
    "data": {"base"},
    "models": {"base"},
    "losses": {"base"},
    "method": {"base", "config", "data", "models", "losses"},
    "evaluation": {"base", "config", "data", "models", "method"},
    "reporting": {"base"},
    "training": {"base", "config", "data", "models", "losses", "method", "evaluation", "reporting"},
}
# Folders below a part that belong to it; a new one must be added here, as a new part must join ALLOWED.
KNOWN_SUBFOLDERS = {"sslbench/config/presets"}
# The face: sslbench/__init__.py (the public API), cli.py, __main__.py, legacy_paths.py.
FACE_MODULES = {path.stem for path in PACKAGE.glob("*.py")}
TORCH_FAMILY = {"torch", "torchvision", "timm"}
MAX_FUNCTION_LINES = 80
MAX_TRAIN_LOOP_LINES = 59  # under 60


# --- the checker ---------------------------------------------------------------------------------------


def _module_name(path: str) -> tuple[list[str], bool]:
    """Dotted parts of the module a file under the repository root defines, and whether it is a package."""
    parts = list(Path(path).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return (parts[:-1] if is_package else parts), is_package


def _resolve_from(node: ast.ImportFrom, path: str) -> str | None:
    """The absolute module of a ``from ... import``; None when a relative one climbs above the top."""
    if node.level == 0:
        return node.module or ""
    module, is_package = _module_name(path)
    package = module if is_package else module[:-1]
    if node.level - 1 >= len(package):
        return None
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(tree: ast.AST, path: str) -> Iterator[tuple[ast.stmt, str]]:
    """Every (statement, module) an import reaches, at any depth: in functions, in TYPE_CHECKING blocks.

    ``from sslbench import x`` reaches ``sslbench.x`` when x is a part or a face module, and the face
    (``sslbench``) otherwise. A relative import above the top level yields ``"<above the top level>"``.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = _resolve_from(node, path)
            if module is None:
                yield node, "<above the top level>"
            elif module == "sslbench":
                for alias in node.names:
                    named = alias.name in ALLOWED or alias.name in FACE_MODULES
                    yield node, f"sslbench.{alias.name}" if named else "sslbench"
            else:
                yield node, module


def _target_part(module: str) -> str | None:
    """The part a module of sslbench belongs to; None outside sslbench; "face" for the face and any
    other name directly under sslbench (an old flat path such as ``sslbench.augment`` included)."""
    if module == "<above the top level>":
        return "face"
    names = module.split(".")
    if names[0] != "sslbench":
        return None
    return names[1] if len(names) > 1 and names[1] in ALLOWED else "face"


def layering_violations(source: str, path: str) -> list[str]:
    """One message per import in ``source`` (the file at ``path``, relative to the repository root, e.g.
    ``sslbench/data/augment.py``) that goes against ALLOWED."""
    rel = Path(path).parts
    if len(rel) < 3 or rel[0] != "sslbench":
        return []  # the face, or not sslbench at all: may import anything
    part = rel[1]
    allowed = ALLOWED.get(part, set())
    problems = []
    for node, module in imported_modules(ast.parse(source, filename=path), path):
        target = _target_part(module)
        if target is None or target == part or target in allowed:
            continue
        what = f"the face ({module})" if target == "face" else f"part '{target}' ({module})"
        may = ", ".join(sorted(allowed)) or "nothing"
        problems.append(
            f"{path}:{node.lineno}: `{ast.unparse(node)}` imports {what}; part '{part}' may import only "
            f"its own modules and: {may}"
        )
    return problems


def _sources(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*.py") if "__pycache__" not in path.parts)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# --- the checker itself -------------------------------------------------------------------------------

FAKE = "sslbench/data/fake.py"
BAD_IMPORTS = [
    "from sslbench.training.loop import train_loop",
    "import sslbench.evaluation.knn",
    "from sslbench import training",
    "from sslbench import Method",
    "from sslbench.cli import main",
    "from sslbench.augment import two_views",
    "from ..method import base",
    "from .. import reporting",
    "from ... import anything",
    "def later():\n    from sslbench.models.heads import MLPHead",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sslbench.config import RunConfig",
]
GOOD_IMPORTS = [
    "from sslbench.base.errors import SSLBenchError",
    "import sslbench.base.collectives",
    "from sslbench import base",
    "from sslbench.data.augment import ViewRecipe",
    "from . import augment",
    "from .augment import two_views",
    "from ..base import errors",
    "import torch\nimport sslbench_methods.dino",
]


@pytest.mark.parametrize("source", BAD_IMPORTS)
def test_checker_reports_an_import_against_the_direction(source: str) -> None:
    problems = layering_violations(source, FAKE)
    assert len(problems) == 1, problems
    line = source.count("\n") + 1  # each bad import is its source's last line
    assert problems[0].startswith(f"{FAKE}:{line}: `")
    assert "part 'data' may import only its own modules and: base" in problems[0]


@pytest.mark.parametrize("source", GOOD_IMPORTS)
def test_checker_accepts_imports_along_the_direction(source: str) -> None:
    assert layering_violations(source, FAKE) == []


def test_checker_names_the_part_reached_and_leaves_the_face_alone() -> None:
    [problem] = layering_violations("from sslbench.training.loop import train_loop\n", FAKE)
    assert problem == (
        f"{FAKE}:1: `from sslbench.training.loop import train_loop` imports part 'training' "
        "(sslbench.training.loop); part 'data' may import only its own modules and: base"
    )
    assert layering_violations("from sslbench import Method", "sslbench/data/__init__.py")
    assert layering_violations("from sslbench.training import loop", "sslbench/cli.py") == []


# --- the package as it is ---------------------------------------------------------------------------------


def test_parts_import_only_in_the_allowed_directions() -> None:
    problems = [
        problem
        for path in _sources(PACKAGE)
        for problem in layering_violations(path.read_text(encoding="utf-8"), _rel(path))
    ]
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_every_folder_is_a_declared_part() -> None:
    folders = {path.parent for path in _sources(PACKAGE)} - {PACKAGE}
    undeclared = sorted(
        _rel(folder)
        for folder in folders
        if not (folder.parent == PACKAGE and folder.name in ALLOWED) and _rel(folder) not in KNOWN_SUBFOLDERS
    )
    assert not undeclared, (
        f"folders of sslbench/ that are not parts in ALLOWED (or KNOWN_SUBFOLDERS): {undeclared}"
    )
    missing = sorted(part for part in ALLOWED if not (PACKAGE / part / "__init__.py").is_file())
    assert not missing, f"parts in ALLOWED without a sslbench/<part>/__init__.py: {missing}"
    gone = sorted(folder for folder in KNOWN_SUBFOLDERS if not (ROOT / folder).is_dir())
    assert not gone, f"KNOWN_SUBFOLDERS that no longer exist: {gone}"


def test_every_package_folder_ships() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    folders = {path.parent for path in _sources(PACKAGE)}
    packages = {".".join(folder.relative_to(ROOT).parts) for folder in folders}
    unlisted = sorted(packages - listed)
    assert not unlisted, (
        f"add to [tool.setuptools] packages in pyproject.toml, or they do not install: {unlisted}"
    )
    no_init = sorted(_rel(folder) for folder in folders if not (folder / "__init__.py").is_file())
    assert not no_init, f"folders with .py files but no __init__.py: {no_init}"


def _public_names() -> set[str]:
    for node in _parse(PACKAGE / "__init__.py").body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("sslbench/__init__.py assigns no __all__")


def test_methods_and_examples_use_only_the_public_api() -> None:
    public = _public_names()
    problems = []
    for path in _sources(ROOT / "methods") + _sources(ROOT / "examples"):
        for node, module in imported_modules(_parse(path), _rel(path)):
            if module != "sslbench" and not module.startswith("sslbench."):
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "sslbench":
                private = sorted(alias.name for alias in node.names if alias.name not in public)
                if not private:
                    continue
                why = f"{private} not in sslbench.__all__"
            else:
                why = "only `from sslbench import NAME, ...` is allowed"
            problems.append(f"{_rel(path)}:{node.lineno}: `{ast.unparse(node)}`: {why}")
    assert not problems, "method files import past the public API:\n" + "\n".join(sorted(set(problems)))


def _reached_files(module: str) -> list[Path]:
    """The files importing ``module`` runs, below the face (sslbench/__init__.py is the face's own)."""
    names = module.split(".")
    files = [PACKAGE.parent.joinpath(*names[:i], "__init__.py") for i in range(2, len(names) + 1)]
    files.append(PACKAGE.parent.joinpath(*names).with_suffix(".py"))
    return [path for path in files if path.is_file()]


def test_reporting_imports_no_torch() -> None:
    """``sslbench report`` reads files: neither reporting nor what it reaches below the face loads torch."""
    todo = _sources(PACKAGE / "reporting")
    seen: set[Path] = set()
    via: dict[Path, str] = {}  # a file reached from outside reporting -> the import that first reached it
    problems = []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node, module in imported_modules(_parse(path), _rel(path)):
            where = f"{_rel(path)}:{node.lineno}"
            if module.split(".")[0] in TORCH_FAMILY:
                reached = f" (reached from {via[path]})" if path in via else ""
                problems.append(f"{where}: `{ast.unparse(node)}`{reached}")
            elif module.startswith("sslbench."):
                # `from sslbench.base import x` may name a module as well as a name
                names = [f"{module}.{alias.name}" for alias in getattr(node, "names", [])]
                for file in [file for name in [module, *names] for file in _reached_files(name)]:
                    via.setdefault(file, where)
                    todo.append(file)
    assert not problems, "reporting loads torch through:\n" + "\n".join(sorted(set(problems)))
    assert PACKAGE / "base" / "atomic_io.py" in seen  # the walk did follow reporting's imports


# --- size ------------------------------------------------------------------------------------------------


def _functions() -> Iterator[tuple[Path, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for path in _sources(PACKAGE):
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path, node


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from ``def`` to the last line of the body; a function's lineno is its def, not a decorator."""
    assert node.end_lineno is not None
    return node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_80_lines() -> None:
    long = [
        f"{_rel(path)}:{node.lineno}: {node.name} is {_length(node)} lines"
        for path, node in _functions()
        if _length(node) > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_train_loop_is_under_60_lines() -> None:
    loop = PACKAGE / "training" / "loop.py"
    [train_loop] = [
        node
        for node in _parse(loop).body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "train_loop"
    ]
    assert _length(train_loop) <= MAX_TRAIN_LOOP_LINES, (
        f"{_rel(loop)}:{train_loop.lineno}: train_loop is {_length(train_loop)} lines, "
        f"the limit is {MAX_TRAIN_LOOP_LINES}"
    )
