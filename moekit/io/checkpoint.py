"""A local model directory: its config.json, its family, and a lazy reader over its tensors."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from moekit.architectures import Family, family_for_config
from moekit.errors import UserError
from moekit.io.safetensors_reader import TensorReader, checkpoint_infos

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_model_dir(ref: str, base_dir: Path | None = None, where: str = "config") -> Path:
    """A model reference from a config, as a local directory. Hub ids are refused: we never download."""
    if not isinstance(ref, str) or not ref.strip():
        raise UserError(f"{where}: model reference {ref!r} must be a path to a local model directory")
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None and not path.exists() and (base_dir / path).exists():
        path = base_dir / path
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{where}: model '{ref}' is a file, not a model directory")
    if _HUB_ID.match(ref) and not ref.startswith((".", "/")):
        raise UserError(
            f"{where}: model '{ref}' is not a local directory; moekit never downloads: fetch it first (e.g. "
            f"`hf download {ref} --local-dir DIR`) and use the directory"
        )
    raise UserError(f"{where}: model directory '{ref}' does not exist")


@dataclass
class Checkpoint:
    """One input model. Tensors are read on demand; nothing is loaded at construction."""

    ref: str
    path: Path
    config: dict
    family: Family
    tensors: TensorReader = field(repr=False)

    @classmethod
    def open(cls, ref: str, base_dir: Path | None = None, where: str = "config") -> Checkpoint:
        path = resolve_model_dir(ref, base_dir, where)
        config_path = path / "config.json"
        if not config_path.is_file():
            raise UserError(f"{where}: model '{ref}' has no config.json")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{config_path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise UserError(f"{config_path}: not a JSON object")
        family = family_for_config(config, str(config_path))
        return cls(ref, path, config, family, TensorReader(checkpoint_infos(path)))

    @property
    def num_layers(self) -> int:
        n = self.config.get(self.family.num_layers_key)
        if not isinstance(n, int) or n < 0:
            raise UserError(
                f"{self.path / 'config.json'}: '{self.family.num_layers_key}' is missing or not a count"
            )
        return n

    def close(self) -> None:
        self.tensors.close()
