"""Where the demo keeps what it builds once per machine, and how it writes it safely.

Everything the demo derives (the converted checkpoint, token windows, specialists) is a pure function of its
inputs, so it is stored under a key made from those inputs and reused. Entries appear whole or not at all:
they are written into a temporary sibling and renamed into place.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moekit.paths import moekit_cache


def cache_root() -> Path:
    """The demo cache directory: $MOEKIT_CACHE, else ~/.cache/moekit."""
    return moekit_cache()


def cache_key(**inputs: object) -> str:
    """A short stable hash of JSON-serialisable inputs: equal inputs, equal key."""
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock held across processes (e.g. parallel test workers building the same cache entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success rename it to `final`, on error delete it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a cache entry is an ordinary directory
    try:
        yield tmp
        if final.exists():  # another process finished the same entry first: theirs is equally valid
            shutil.rmtree(tmp)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_file(final: Path, write) -> Path:
    """Call `write(tmp_path)` on a temporary sibling of `final`, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp makes it private; a cache entry is an ordinary file
        tmp.replace(final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final
