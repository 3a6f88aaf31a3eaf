"""Lazy, validating reader for safetensors checkpoints (single file or sharded with an index).

We parse the header ourselves instead of using `safetensors.safe_open`: safe_open memory-maps whole files, and every
page a merge touches then counts towards resident memory until the map is dropped. Reading each tensor with
`readinto` into a fresh buffer keeps peak memory at the tensors in flight, lets us read row ranges of a tensor,
and lets us check every offset against the file size and explain a broken file in one line.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.errors import UserError

if TYPE_CHECKING:
    import torch

# The header's dtype names and their element sizes. torch is imported only when a tensor is read or its torch
# dtype is asked for, so that checking a checkpoint's headers (before a merge imports torch) needs no torch.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}  # fmt: skip


@functools.cache
def _dtype_tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    import torch

    dtypes = {name: getattr(torch, attr) for name, attr in _TORCH_DTYPES.items()}
    return dtypes, {v: k for k, v in dtypes.items()}


def __getattr__(name: str):
    # DTYPES (header name -> torch dtype) and DTYPE_NAMES (the reverse), made on first use: they import torch.
    if name == "DTYPES":
        return _dtype_tables()[0]
    if name == "DTYPE_NAMES":
        return _dtype_tables()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLED_SUFFIXES = (".bin", ".pt", ".pth")
# Unpickling can run arbitrary code, so pickled weights are read only on request (moekit.io.pickle_reader).
PICKLE_REFUSAL = (
    "loading a pickle can run code, so it is refused: convert the weights to safetensors, or pass --allow-pickle "
    "(allow_pickle=True in Python) to load them with torch.load(weights_only=True)"
)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype (the header's name for it) and shape."""

    name: str
    dtype_name: str
    shape: tuple[int, ...]
    path: Path
    start: int
    end: int

    @property
    def dtype(self) -> torch.dtype:
        return _dtype_tables()[0][self.dtype_name]

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header. Every problem is a one-line UserError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: not a safetensors file (only {size} bytes); re-download it")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise UserError(
                    f"{path}: header length {n} does not fit in the file ({size} bytes); the file is truncated or "
                    "not safetensors; re-download it"
                )
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: corrupt safetensors header (not JSON: {e}); re-download the file") from None
    except _DuplicateKey as e:
        raise UserError(
            f"{path}: the header names {str(e)[:120]!r} twice (a JSON reader keeps one silently, safetensors refuses "
            "the file); the file is corrupt: re-download it"
        ) from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (not a JSON object); re-download the file")

    data_start = 8 + n
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name] = _tensor_info(path, name, entry, data_start, data_len)
    _check_no_overlap(path, infos)
    return infos


class _DuplicateKey(Exception):
    pass


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    where = f"{path}: tensor '{name}'"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: header entry is not an object; the file is corrupt")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype_name not in DTYPE_SIZES:
        raise UserError(f"{where}: unknown dtype {dtype_name!r}; known: {', '.join(DTYPE_SIZES)}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise UserError(f"{where}: bad shape {shape!r} in the header; the file is corrupt")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise UserError(f"{where}: bad data_offsets {offsets!r} in the header; the file is corrupt")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype_name]
    if not 0 <= begin <= end:
        raise UserError(f"{where}: data_offsets {offsets} are not ordered; the file is corrupt")
    if end - begin != expected:
        raise UserError(
            f"{where}: header says {dtype_name} {shape} ({expected} bytes) but its data_offsets span "
            f"{end - begin} bytes; the header lies about dtype, shape or offsets"
        )
    if end > data_len:
        raise UserError(
            f"{where}: data ends at byte {end} but the file holds only {data_len} data bytes; the file is "
            "truncated: re-download it"
        )
    return TensorInfo(name, dtype_name, tuple(shape), path, data_start + begin, data_start + end)


def _check_no_overlap(path: Path, infos: dict[str, TensorInfo]) -> None:
    spans = sorted((i.start, i.end, i.name) for i in infos.values() if i.end > i.start)
    for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise UserError(
                f"{path}: tensors '{name_a}' and '{name_b}' overlap in the file; the header is corrupt"
            )


class CheckpointReader:
    """What the planner and engine need of a checkpoint's tensors: `infos`, membership, `read(name, rows)`, close."""

    infos: dict[str, TensorInfo]

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> list[str]:
        return list(self.infos)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Shard files a reader keeps open between reads. Consecutive reads mostly hit the same shard (the row chunks of one
# tensor); reopening costs microseconds against the megabytes read, and a checkpoint of hundreds of shards must
# not need hundreds of file descriptors (a merge under `ulimit -n 16` has to work, and to clean up after itself).
MAX_OPEN_SHARDS = 2


class TensorReader(CheckpointReader):
    """Reads tensors (or row ranges of them) from a set of safetensors files, one at a time, without mmap."""

    def __init__(self, infos: dict[str, TensorInfo]):
        self.infos = infos
        self._handles: dict[Path, object] = {}  # most recently used last

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name` in its stored dtype; with `rows=(a, b)`, only rows a..b of dimension 0."""
        import torch

        info = self.infos[name]
        start, shape = info.start, list(info.shape)
        if rows is not None:
            row_bytes = info.nbytes // shape[0] if shape and shape[0] else 0
            a, b = rows
            start += a * row_bytes
            shape[0] = b - a
        nbytes = math.prod(shape) * info.dtype.itemsize
        buf = bytearray(nbytes)
        f = self._handle(info.path)
        f.seek(start)
        got = f.readinto(buf) if nbytes else 0
        if got != nbytes:
            raise UserError(
                f"{info.path}: tensor '{name}' is cut short ({got} of {nbytes} bytes); re-download the file"
            )
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(shape)

    def _handle(self, path: Path):
        f = self._handles.pop(path, None)
        if f is None:
            while len(self._handles) >= MAX_OPEN_SHARDS:
                self._handles.pop(next(iter(self._handles))).close()
            try:
                f = open(path, "rb")  # noqa: SIM115 - kept open across reads, closed here or in close()
            except OSError as e:
                raise UserError(f"{path}: cannot open: {e.strerror or e}") from None
        self._handles[path] = f
        return f

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


def safe_child(model_dir: Path, filename: object, what: str) -> Path:
    """`model_dir / filename`, refusing names (or symlinks) that lead outside `model_dir`."""
    if not isinstance(filename, str) or not filename or "\x00" in filename:
        raise UserError(f"{what}: shard name {filename!r} is not a file name")
    if os.path.isabs(filename) or Path(filename).drive:
        raise UserError(
            f"{what}: shard name '{filename}' is an absolute path; only files inside the model directory are read"
        )
    root = model_dir.resolve()
    target = (model_dir / filename).resolve()
    if target != root and root not in target.parents:
        raise UserError(
            f"{what}: shard name '{filename}' points outside the model directory {model_dir}; refusing it"
        )
    return model_dir / filename


def read_weight_map(index_path: Path) -> dict:
    """The `weight_map` (tensor -> shard file) of a checkpoint index, or a one-line error."""
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{index_path}: not valid JSON ({e}); re-download the index") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index_path}: no 'weight_map' object; the index is corrupt")
    return weight_map


def checkpoint_infos(model_dir: Path) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint directory: the index and its shards, or a single safetensors file."""
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        weight_map = read_weight_map(index_path)
        shards: dict[str, list[str]] = {}
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str):
                raise UserError(
                    f"{index_path}: tensor '{tensor}' maps to {shard!r:.60}, not a file name; the index is corrupt"
                )
            shards.setdefault(shard, []).append(tensor)
        infos: dict[str, TensorInfo] = {}
        for shard, tensors in shards.items():
            path = safe_child(model_dir, shard, str(index_path))
            if isinstance(shard, str) and shard.endswith(PICKLED_SUFFIXES):
                raise UserError(f"{index_path}: shard '{shard}' holds pickled weights; {PICKLE_REFUSAL}")
            if not path.is_file():
                raise UserError(
                    f"{index_path}: shard '{shard}' (holding '{tensors[0]}') is missing; re-download it"
                )
            header = read_header(path)
            for tensor in tensors:
                if tensor not in header:
                    raise UserError(
                        f"{index_path}: tensor '{tensor}' is mapped to '{shard}' but that file does not hold it"
                    )
                infos[tensor] = header[tensor]
        return infos
    single = model_dir / SINGLE_NAME
    if single.is_file():
        safe_child(model_dir, SINGLE_NAME, str(model_dir))
        return read_header(single)
    files = sorted(model_dir.glob("*.safetensors"))
    if len(files) == 1:
        safe_child(model_dir, files[0].name, str(model_dir))
        return read_header(files[0])
    if files:
        raise UserError(
            f"{model_dir}: {len(files)} safetensors files but no {INDEX_NAME}; add the index or keep one file"
        )
    if any(p.is_file() for suffix in PICKLED_SUFFIXES for p in model_dir.glob(f"*{suffix}")):
        raise UserError(f"{model_dir}: only pickled weights (.bin/.pt/.pth) found; {PICKLE_REFUSAL}")
    raise UserError(f"{model_dir}: no model weights (no {SINGLE_NAME} or {INDEX_NAME})")
