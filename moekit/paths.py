"""Where moekit keeps its cache, how a path written in a config becomes a local path, and the two paths of a
`model+adapter` reference (mergekit's syntax for a model with a LoRA applied). Nothing here imports torch: the
CLI checks a config's paths before it pays for that import.

A config may name a model under the moekit cache as `${MOEKIT_CACHE}/...` (or `$MOEKIT_CACHE/...`): the demo's
configs do, so they run by hand wherever `$MOEKIT_CACHE` puts the demo. Only that one variable is expanded,
and only at the start of a path: model paths are not shell words, and a `$` elsewhere is kept as written.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from moekit.errors import UserError

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


def _exists(ref: str, base_dir: Path | None) -> bool:
    path = expand_path(ref)
    return path.exists() or (not path.is_absolute() and base_dir is not None and (base_dir / path).exists())


def split_adapter_ref(
    ref: str, base_dir: Path | None = None, where: str = "config"
) -> tuple[str, str | None]:
    """(model, adapter or None) for a reference. 'a+b' names base `a` and adapter `b` unless 'a+b' itself exists,
    so a directory whose name holds a '+' still works."""
    if not isinstance(ref, str) or "+" not in ref or _exists(ref, base_dir):
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise UserError(
            f"{where}: model reference '{ref}' is not MODEL+ADAPTER (exactly one '+' between two paths)"
        )
    model, adapter = parts
    adapter_path = expand_path(adapter)
    if not adapter_path.is_absolute() and base_dir is not None and not adapter_path.exists():
        adapter_path = base_dir / adapter_path
    if not adapter_path.is_dir():
        raise UserError(
            f"{where}: LoRA adapter '{adapter}' (in '{ref}') is not a local directory; it needs adapter_config.json "
            "and adapter_model.safetensors"
        )
    return model, str(adapter_path)


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, adapter_config.json), or one line saying why not."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object")
    return data
