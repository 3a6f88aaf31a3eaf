"""A local model directory: its config.json, its family, and a lazy reader over its tensors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.architectures import Family, check_implied_shapes, family_for_config
from moekit.errors import UserError
from moekit.io.safetensors_reader import TensorReader, checkpoint_infos
from moekit.paths import expand_path, read_json_object, split_adapter_ref

if TYPE_CHECKING:  # the torch-backed readers are imported when used: reading headers needs no torch
    from moekit.io.pickle_reader import PickleReader

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def open_tensors(model_dir: Path, allow_pickle: bool = False) -> TensorReader | PickleReader:
    """A lazy reader over the weights of `model_dir`: safetensors, or with `allow_pickle` (the user's
    --allow-pickle) the pickled weights of a directory that holds only those, loaded with weights_only=True."""
    if allow_pickle:
        from moekit.io.pickle_reader import (
            PickleReader,
            holds_pickled_weights_only,
            pickled_files,
            pickled_index,
        )

        if holds_pickled_weights_only(model_dir):
            return PickleReader(pickled_files(model_dir, pickled_index(model_dir)))
    return TensorReader(checkpoint_infos(model_dir))


def check_config_matches_tensors(config_path: Path, config: dict, family: Family, infos: dict) -> None:
    """config.json's layer count and hidden size agree with the tensors, so a wrong config cannot merge silently
    (a num_hidden_layers that is too small would otherwise drop the layers past it without a word)."""
    check_layer_numbers(config_path.parent, family, infos)
    layers = {loc[0] for loc in map(family.layer_of, infos) if loc is not None}
    declared = config.get(family.num_layers_key)
    if layers and isinstance(declared, int) and not isinstance(declared, bool):
        held = max(layers) + 1
        if declared != held:
            raise UserError(
                f"{config_path}: {family.num_layers_key} is {declared} but the weights hold {held} layers "
                f"({family.layer_prefix}0 to {family.layer_prefix}{held - 1}); fix config.json or re-download the model"
            )
        if len(layers) != held:
            gaps = sorted(set(range(held)) - layers)
            raise UserError(
                f"{config_path}: the weights have no tensors for layer(s) {gaps[:5]} of {held}; the checkpoint is incomplete"
            )
    embed = infos.get(family.input_embedding)
    hidden = config.get(family.hidden_key)
    if embed is not None and len(embed.shape) == 2 and isinstance(hidden, int) and embed.shape[1] != hidden:
        raise UserError(
            f"{config_path}: hidden_size is {hidden} but tensor '{embed.name}' is {list(embed.shape)}; fix config.json "
            "or re-download the model"
        )
    check_implied_shapes(str(config_path), config, family, {name: info.shape for name, info in infos.items()})


MAX_LAYERS = 100_000  # far past any real model; a layer number beyond it is a corrupt or hostile header


def check_layer_numbers(model_dir: Path, family: Family, infos: dict) -> None:
    """Refuse tensor names whose layer number no model has (5000 digits, 3e9), before anything counts layers."""
    prefix = family.layer_prefix
    for name in infos:
        digits = re.match(r"\d+", name[len(prefix) :]) if name.startswith(prefix) else None
        if digits and (len(digits[0]) > 6 or int(digits[0]) >= MAX_LAYERS):
            shown = digits[0] if len(digits[0]) <= 12 else f"{digits[0][:12]}... ({len(digits[0])} digits)"
            raise UserError(
                f"{model_dir}: tensor '{name[:80]}{'...' if len(name) > 80 else ''}' is in layer {shown}, past any real "
                f"model (moekit takes at most {MAX_LAYERS} layers); the checkpoint is corrupt"
            )


def resolve_model_dir(ref: str, base_dir: Path | None = None, where: str = "config") -> Path:
    """A model reference from a config, as a local directory. Hub ids are refused: we never download."""
    if not isinstance(ref, str) or not ref.strip():
        raise UserError(f"{where}: model reference {ref!r} must be a path to a local model directory")
    path = expand_path(ref)
    if not path.is_absolute() and base_dir is not None:  # relative to the config file, wherever moekit runs
        path = base_dir / path
    path = path.absolute()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{where}: model '{ref}' is a file, not a model directory")
    if _HUB_ID.match(ref) and not ref.startswith((".", "/")):
        raise UserError(
            f"{where}: model '{ref}' is not a local directory; moekit never downloads: fetch it first (e.g. "
            f"`hf download {ref} --local-dir DIR`) and use the directory"
        )
    shown = f" ({path})" if str(path) != ref else ""
    raise UserError(f"{where}: model directory '{ref}'{shown} does not exist")


@dataclass
class Checkpoint:
    """One input model. Tensors are read on demand; nothing is loaded at construction."""

    ref: str
    path: Path
    config: dict
    family: Family
    tensors: TensorReader | PickleReader = field(repr=False)

    @classmethod
    def open(
        cls, ref: str, base_dir: Path | None = None, where: str = "config", allow_pickle: bool = False
    ) -> Checkpoint:
        model_ref, adapter = split_adapter_ref(ref, base_dir, where)  # mergekit's 'model+lora'
        path = resolve_model_dir(model_ref, base_dir, where)
        config_path = path / "config.json"
        if not config_path.is_file():
            raise UserError(f"{where}: model '{ref}' has no config.json")
        config = read_json_object(config_path)
        family = family_for_config(config, str(config_path))
        tensors = open_tensors(path, allow_pickle)
        try:
            check_config_matches_tensors(config_path, config, family, tensors.infos)
        except UserError:
            tensors.close()
            raise
        if adapter is not None:
            from moekit.lora.reference import with_adapter

            tensors = with_adapter(tensors, adapter)
        return cls(ref, path, config, family, tensors)

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
