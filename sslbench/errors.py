"""The one exception type a user is meant to read.

The CLI prints a ``SSLBenchError`` as a single message without a traceback; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SSLBenchError(Exception):
    """Bad input or an unusable environment, with a message that says what to do."""


def unknown_name_message(kind: str, name: str, valid: Iterable[str]) -> str:
    """``unknown method 'dnio' (did you mean 'dino'?); valid: byol, dino, ...``."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown {kind} '{name}'{hint}; valid {kind}s: {', '.join(valid) or '(none)'}"
