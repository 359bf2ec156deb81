"""The one exception type a user is meant to read.

The CLI prints a ``SSLBenchError`` as a single message without a traceback; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SSLBenchError(Exception):
    """Bad input or an unusable environment, with a message that says what to do."""

    def __init__(self, message: str = "", *args: object) -> None:
        # A DataLoader worker's exception is raised again in the main process as ``type(text)``, the text
        # holding the worker's traceback, whose last line ends with the original one-line message.
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            message = message.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
        super().__init__(message, *args)


def unknown_name_message(kind: str, name: str, valid: Iterable[str]) -> str:
    """``unknown method 'dnio' (did you mean 'dino'?); valid: byol, dino, ...``."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown {kind} '{name}'{hint}; valid {kind}s: {', '.join(valid) or '(none)'}"
