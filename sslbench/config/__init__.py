"""The run's configuration: typed settings (``run_config``), read from their layers (``loading``), and
the presets (``presets/``). Every other part reads a RunConfig; this part reads none of them."""

from sslbench.config.loading import (
    PRESETS,
    load_preset,
    load_yaml,
    merge,
    parse_set,
    preset_text,
    resolve_config,
    yaml_error_message,
)
from sslbench.config.run_config import (
    OPTIMIZERS,
    EvalConfig,
    RunConfig,
    TrainConfig,
    build_dataclass,
    check_choices,
    check_values,
    config_hash,
    config_to_dict,
    unknown_key_message,
)

__all__ = [
    "EvalConfig",
    "OPTIMIZERS",
    "PRESETS",
    "RunConfig",
    "TrainConfig",
    "build_dataclass",
    "check_choices",
    "check_values",
    "config_hash",
    "config_to_dict",
    "load_preset",
    "load_yaml",
    "merge",
    "parse_set",
    "preset_text",
    "resolve_config",
    "unknown_key_message",
    "yaml_error_message",
]
