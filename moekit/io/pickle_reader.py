"""Reader for pickled PyTorch weights (`pytorch_model.bin`, `.pt`, `.pth`), used only after `--allow-pickle`.

A pickle can run any code when it is loaded, so moekit refuses these files unless the user opts in, and even then
loads them with `torch.load(weights_only=True)`, whose unpickler builds only tensors and plain containers. `mmap`
keeps the data in the file until a tensor is read, so memory stays at the tensors in flight, as with safetensors.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import torch

from moekit.errors import UserError
from moekit.io.safetensors_reader import (
    DTYPE_NAMES,
    INDEX_NAME,
    PICKLED_SUFFIXES,
    CheckpointReader,
    TensorInfo,
    read_weight_map,
    safe_child,
)

PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"


def is_pickle_name(name: object) -> bool:
    return isinstance(name, str) and name.endswith(PICKLED_SUFFIXES)


def pickled_index(model_dir: Path) -> Path | None:
    """The directory's index (safetensors' first) when its weight map names pickled shards, else None."""
    for name in (INDEX_NAME, PICKLE_INDEX_NAME):
        path = model_dir / name
        if path.is_file():
            try:
                weight_map = json.loads(path.read_text()).get("weight_map")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                return None  # the safetensors reader explains a broken index
            if isinstance(weight_map, dict) and any(is_pickle_name(s) for s in weight_map.values()):
                return path
            return None
    return None


def holds_pickled_weights_only(model_dir: Path) -> bool:
    """Whether the weights of `model_dir` are pickled: an index naming .bin shards, or no safetensors at all."""
    if pickled_index(model_dir) is not None:
        return True
    if (model_dir / INDEX_NAME).is_file() or any(model_dir.glob("*.safetensors")):
        return False
    return any(p.is_file() for suffix in PICKLED_SUFFIXES for p in model_dir.glob(f"*{suffix}"))


def pickled_files(model_dir: Path, index_path: Path | None) -> dict[Path, list[str] | None]:
    """The pickled weight files of `model_dir` and the tensors an index maps to each (None: whatever it holds).

    `index_path` is an index whose weight map names pickled shards (either `pytorch_model.bin.index.json` or a
    safetensors index that points at `.bin` files); without one, the directory must hold a single pickled file.
    """
    if index_path is not None:
        weight_map = read_weight_map(index_path)
        files: dict[Path, list[str] | None] = {}
        for tensor, shard in weight_map.items():
            path = safe_child(model_dir, shard, str(index_path))
            if not is_pickle_name(shard):
                raise UserError(
                    f"{index_path}: shard '{shard}' is not a pickled weights file; an index must not mix "
                    "safetensors and .bin shards"
                )
            if not path.is_file():
                raise UserError(
                    f"{index_path}: shard '{shard}' (holding '{tensor}') is missing; re-download it"
                )
            files.setdefault(path, []).append(tensor)
        return files
    found = sorted(p for suffix in PICKLED_SUFFIXES for p in model_dir.glob(f"*{suffix}") if p.is_file())
    if len(found) != 1:
        raise UserError(
            f"{model_dir}: {len(found)} pickled weight files but no {PICKLE_INDEX_NAME}; add the index or keep one file"
        )
    safe_child(model_dir, found[0].name, str(model_dir))
    return {found[0]: None}


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it would call {refused.group(1)}" if refused else "it holds objects other than tensors"
        raise UserError(
            f"{path}: refused by torch.load(weights_only=True): {what}; this file is not plain weights, do not trust it"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path}: cannot load as PyTorch weights with weights_only=True ({first[:200]}); the file is corrupt "
            "or in torch's legacy format: re-download it or convert it to safetensors"
        ) from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: holds a {type(loaded).__name__}, not a state dict of tensors")
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise UserError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor; only flat state dicts are read"
            )
    return loaded


class PickleReader(CheckpointReader):
    """The TensorReader interface (infos, names, read with row ranges, close) over mmap-loaded pickled weights."""

    def __init__(self, files: dict[Path, list[str] | None]):
        self._tensors: dict[str, torch.Tensor] = {}
        self.infos: dict[str, TensorInfo] = {}
        for path, expected in files.items():
            state = _load_state_dict(path)
            for tensor in expected or []:
                if tensor not in state:
                    raise UserError(
                        f"{path}: the index maps tensor '{tensor}' to this file but it does not hold it"
                    )
            for name in expected if expected is not None else list(state):
                t = state[name]
                if t.dtype not in DTYPE_NAMES:
                    raise UserError(
                        f"{path}: tensor '{name}' is {t.dtype}, which no safetensors file can hold"
                    )
                nbytes = math.prod(t.shape) * t.dtype.itemsize
                self.infos[name] = TensorInfo(name, DTYPE_NAMES[t.dtype], tuple(t.shape), path, 0, nbytes)
                self._tensors[name] = t

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A private copy of tensor `name` (or of rows a..b of dimension 0), never a view into the mapped file."""
        t = self._tensors[name]
        if rows is not None:
            t = t[rows[0] : rows[1]]
        return t.clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        self._tensors.clear()
