"""Streaming safetensors writer and the atomic output directory.

A safetensors header lists every tensor's offsets before the data, so a writer that does not know the layout in
advance must keep tensors in memory until a shard is full (this is why mergekit's writer holds the whole output).
A merge plan knows every output name, dtype and shape before the first byte is written, so we lay the shards out up
front, write each header first, and then stream each tensor's bytes straight to disk as soon as it is computed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.errors import UserError
from moekit.io.output_dir import atomic_output_dir
from moekit.io.safetensors_reader import DTYPE_NAMES, INDEX_NAME, SINGLE_NAME


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def shard_layout(tensors: Sequence[OutputTensor], shard_size: int) -> list[list[OutputTensor]]:
    """Split tensors, in order, into shards of at most `shard_size` bytes (a bigger tensor gets a shard alone)."""
    shards: list[list[OutputTensor]] = [[]]
    used = 0
    for t in tensors:
        if shards[-1] and used + t.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += t.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header_bytes(shard: Sequence[OutputTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in shard:
        header[t.name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


SYNC_EVERY = 256 << 20  # bytes written between background flushes to disk


class ShardedWriter:
    """Writes `tensors` (known up front) into `out_dir`, one tensor at a time, in the given order.

    Every shard is fsynced before the output directory is renamed into place, so a crash never leaves a complete-
    looking model with missing bytes. The flushing happens on a background thread as the shard grows, so the
    disk works while the merge computes and the final fsync has little left to wait for."""

    def __init__(self, out_dir: Path, tensors: Sequence[OutputTensor], shard_size: int):
        self.out_dir = Path(out_dir)
        self.shards = shard_layout(tensors, shard_size)
        self.files = shard_names(len(self.shards))
        self._order = [(si, t) for si, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._written = 0
        self._file = None
        self._shard = -1
        self._unsynced = 0
        self._sync: threading.Thread | None = None
        self._sync_error: OSError | None = None

    def write(self, name: str, tensor: torch.Tensor, last: bool = True) -> None:
        """Append `tensor` to output `name`. A tensor may come in row chunks: pass last=False for all but the final one."""
        if self._next >= len(self._order):
            raise RuntimeError(f"writer: unexpected extra tensor {name}")
        si, spec = self._order[self._next]
        if spec.name != name or tensor.dtype != spec.dtype or tuple(tensor.shape[1:]) != spec.shape[1:]:
            raise RuntimeError(
                f"writer: expected {spec.name} {spec.dtype} {spec.shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        if si != self._shard:
            self._open_shard(si)
        if tensor.numel():
            self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._written += tensor.numel() * tensor.element_size()
        self._unsynced += tensor.numel() * tensor.element_size()
        if self._unsynced >= SYNC_EVERY and (self._sync is None or not self._sync.is_alive()):
            self._file.flush()
            self._sync = threading.Thread(
                target=self._flush_to_disk, args=(self._file.fileno(),), daemon=True
            )
            self._sync.start()
            self._unsynced = 0
        if last:
            if self._written != spec.nbytes:
                raise RuntimeError(f"writer: {name} got {self._written} bytes, planned {spec.nbytes}")
            self._written = 0
            self._next += 1

    def _open_shard(self, si: int) -> None:
        self._close_file()
        self._shard = si
        self._file = open(self.out_dir / self.files[si], "wb")  # noqa: SIM115 - closed in _close_file
        self._file.write(_header_bytes(self.shards[si], {"format": "pt"}))

    def _flush_to_disk(self, fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError as e:  # Linux reports a write-back error once per file: keep it for the final fsync
            self._sync_error = e

    def _wait_for_sync(self) -> None:
        if self._sync is not None:
            self._sync.join()
            self._sync = None
        if self._sync_error is not None:
            error, self._sync_error = self._sync_error, None
            raise error

    def _close_file(self) -> None:
        self._wait_for_sync()
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self._unsynced = 0

    def close(self) -> None:
        """Finish the last shard and write the index (when sharded). Fails if a planned tensor was not written."""
        self._close_file()
        if self._next != len(self._order):
            raise RuntimeError(f"writer: {len(self._order) - self._next} planned tensors were not written")
        if len(self.shards) > 1:
            weight_map = {t.name: self.files[si] for si, shard in enumerate(self.shards) for t in shard}
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._sync is not None:
            self._sync.join()
            self._sync = None
        if self._file is not None:
            self._file.close()
            self._file = None


@contextmanager
def streaming_output(
    out: Path, force: bool, tensors: Sequence[OutputTensor], shard_size: int
) -> Iterator[tuple[Path, ShardedWriter]]:
    """The temporary output directory and a writer over it. On success the shards are finished and the directory
    renamed into place; a full disk or any other failure leaves nothing behind and says so in one line."""
    with atomic_output_dir(out, force) as tmp:
        writer = ShardedWriter(tmp, tensors, shard_size)
        try:
            yield tmp, writer
            writer.close()
        except OSError as e:
            writer.abort()
            what = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise UserError(
                f"cannot write the output in '{tmp.parent}': {what}; nothing was written"
            ) from None
        except BaseException:
            writer.abort()
            raise
