"""What a method is: the ``Method`` base class and the small types it exchanges with the training loop
(``base``), and the registry that finds methods by name (``registry``)."""

from sslbench.method.base import Method, NoOptions, Step, StepOutput, TrainContext
from sslbench.method.registry import get_method, list_methods, load_plugin_file, register_method

__all__ = [
    "Method",
    "NoOptions",
    "Step",
    "StepOutput",
    "TrainContext",
    "get_method",
    "list_methods",
    "load_plugin_file",
    "register_method",
]
