"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a `UserError` into a single line on stderr and exit code 2; anything else
is a bug in moekit and keeps its traceback (exit 1).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input: config, files, or options. Message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), sorted(set(map(str, choices))), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
