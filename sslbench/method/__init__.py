"""What a method is: the ``Method`` base class and the small types it exchanges with the training loop
(``base``), the registry that finds methods by name (``registry``), and the published recipes
``--recipe paper`` applies (``recipes``)."""

from sslbench.method.base import Method, NoOptions, ParameterRule, Step, StepOutput, TrainContext
from sslbench.method.recipes import PaperRecipe, nearest_epochs
from sslbench.method.registry import get_method, list_methods, load_plugin_file, register_method

__all__ = [
    "Method",
    "NoOptions",
    "PaperRecipe",
    "ParameterRule",
    "Step",
    "StepOutput",
    "TrainContext",
    "get_method",
    "list_methods",
    "load_plugin_file",
    "nearest_epochs",
    "register_method",
]
