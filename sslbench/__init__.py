"""sslbench: a pluggable benchmark for self-supervised visual representation learning.

The public API for method authors: subclass ``Method``, decorate it with ``register_method``, and
use the shared pieces (heads, losses, EMA, multi-crop forward) it is written with.
"""

from sslbench.backbones import ARCHS, Backbone, create_backbone, multicrop_forward
from sslbench.errors import SSLBenchError
from sslbench.method import Method, NoOptions, Step, StepOutput, TrainContext
from sslbench.momentum import ema_copy, ema_update
from sslbench.registry import get_method, list_methods, load_plugin_file, register_method

__version__ = "0.1.0"

__all__ = [
    "ARCHS",
    "Backbone",
    "Method",
    "NoOptions",
    "SSLBenchError",
    "Step",
    "StepOutput",
    "TrainContext",
    "create_backbone",
    "ema_copy",
    "ema_update",
    "get_method",
    "list_methods",
    "load_plugin_file",
    "multicrop_forward",
    "register_method",
]
