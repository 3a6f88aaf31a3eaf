"""Where moekit keeps its cache, and how a path written in a config becomes a local path.

A config may name a model under the moekit cache as `${MOEKIT_CACHE}/...` (or `$MOEKIT_CACHE/...`): the demo's
configs do, so they run by hand wherever `$MOEKIT_CACHE` puts the demo. Only that one variable is expanded,
and only at the start of a path: model paths are not shell words, and a `$` elsewhere is kept as written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CACHE_VARIABLE = "MOEKIT_CACHE"
_CACHE_PREFIX = re.compile(r"^\$(\{MOEKIT_CACHE\}|MOEKIT_CACHE)(?=/|$)")


def moekit_cache() -> Path:
    """The cache directory: $MOEKIT_CACHE, else ~/.cache/moekit."""
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "moekit").expanduser()


def expand_path(ref: str) -> Path:
    """A path from a config, with a leading ${MOEKIT_CACHE} (or $MOEKIT_CACHE) and a leading ~ expanded."""
    return Path(
        _CACHE_PREFIX.sub(lambda _: str(moekit_cache()).replace("\\", "\\\\"), ref, count=1)
    ).expanduser()
