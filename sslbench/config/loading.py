"""RunConfig from its layers: defaults <- preset YAML <- user YAML <- CLI flags <- ``--set key=value``.

Every layer is validated the same way (``sslbench.config.run_config``); a YAML error names the file,
line and column.
"""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sslbench.base.errors import SSLBenchError, unknown_name_message
from sslbench.config.run_config import RunConfig, build_dataclass, check_values, unknown_key_message

PRESETS = ("quick", "cifar10", "imagenet", "imagenet-boost")


class ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; researchers write learning rates that way."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise SSLBenchError(f"config file not found: {file}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        message = f"cannot read config file {file} ({error}): give a readable UTF-8 YAML file"
        raise SSLBenchError(message) from error
    try:
        data = _parse_yaml(text) or {}
    except yaml.YAMLError as error:
        raise SSLBenchError(yaml_error_message(file, text, error)) from error
    if not isinstance(data, dict):
        raise SSLBenchError(f"config file {file} must hold a mapping of keys to values")
    return data


def yaml_error_message(file: Path, text: str, error: yaml.YAMLError) -> str:
    """``YAML syntax error in F, line L: PROBLEM at column C ('the line') (CONTEXT); what to check``."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or " ".join(str(error).split())
    advice = "check the indentation (spaces, not tabs), quotes and brackets there"
    if mark is None:
        return f"YAML syntax error in {file}: {problem}; {advice}"
    lines = text.splitlines()
    shown = f" ({lines[mark.line].rstrip()!r})" if mark.line < len(lines) and lines[mark.line].strip() else ""
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    started = ""
    if context and context_mark is not None and context_mark.line != mark.line:
        started = f" ({context} from line {context_mark.line + 1})"
    return (
        f"YAML syntax error in {file}, line {mark.line + 1}: {problem} at column {mark.column + 1}"
        f"{shown}{started}; {advice}"
    )


def preset_text(name: str) -> str:
    """The preset's YAML source; its first comment line describes it (``sslbench list`` shows it)."""
    if name not in PRESETS:
        raise SSLBenchError(unknown_name_message("preset", name, PRESETS))
    return resources.files("sslbench.config.presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def load_preset(name: str) -> dict[str, Any]:
    return _parse_yaml(preset_text(name)) or {}


def parse_set(assignment: str) -> dict[str, Any]:
    """``train.epochs=3`` -> ``{"train": {"epochs": 3}}``; values are parsed as YAML scalars/lists."""
    if "=" not in assignment:
        raise SSLBenchError(f"--set expects key=value (e.g. train.epochs=3), got '{assignment}'")
    key, raw = assignment.split("=", 1)
    try:
        value = _parse_yaml(raw)
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def resolve_config(layers: list[dict[str, Any]], method_names: list[str]) -> RunConfig:
    """Merge the layers in order, move method sections aside, validate everything but method options.
    ``methods: [all]`` (``--methods all``) stands for every registered method."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge(merged, layer)
    top_fields = {f.name for f in dataclasses.fields(RunConfig)} - {"method_options"}
    method_options = {k: merged.pop(k) for k in list(merged) if k in method_names and k not in top_fields}
    unknown = [k for k in merged if k not in top_fields]
    if unknown:
        valid = sorted(top_fields) + list(method_names)
        raise SSLBenchError(unknown_key_message(unknown[0], valid))
    config = build_dataclass(RunConfig, merged, "")
    for name, options in method_options.items():
        if not isinstance(options, dict):
            raise SSLBenchError(f"config section '{name}' (options of method {name}) must be a mapping")
    config.method_options = method_options
    if config.methods == ["all"]:  # every registered method, in the registry's order
        config.methods = list(method_names)
    check_values(config)
    return config
