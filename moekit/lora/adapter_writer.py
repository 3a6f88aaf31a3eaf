"""Writing a PEFT adapter directory: adapter_model.safetensors whose tensor shapes are learnt as they are made.

An adapter's factor shapes are only known after each SVD (a singular-value threshold picks the rank), so the
safetensors header cannot be written first as the model writer does. Tensors are spooled to a scratch file as
they come, and the final file is the header followed by the spool copied in chunks: memory holds one tensor at
a time, whatever the model's size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from moekit.io.safetensors_reader import DTYPE_NAMES
from moekit.lora.adapter import CONFIG_NAME, WEIGHTS_NAME

_COPY_CHUNK = 64 << 20


class AdapterWriter:
    """Collects tensors for `dir/adapter_model.safetensors`; `finish(config)` writes it and adapter_config.json."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self._spool_path = self.out_dir / ".adapter.spool"
        self._spool = open(self._spool_path, "wb")  # noqa: SIM115 - closed in finish()
        self._header: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise RuntimeError(f"adapter writer: tensor '{name}' written twice")
        t = tensor.detach().contiguous().cpu()
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        if nbytes:
            self._spool.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self._offset, self._offset + nbytes],
        }
        self._offset += nbytes

    def finish(self, config: dict) -> None:
        self._spool.close()
        header = {"__metadata__": {"format": "pt"}, **dict(sorted(self._header.items()))}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(self.out_dir / WEIGHTS_NAME, "wb") as out, open(self._spool_path, "rb") as spool:
            out.write(len(raw).to_bytes(8, "little") + raw)
            shutil.copyfileobj(spool, out, _COPY_CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.unlink(self._spool_path)
        (self.out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        self._spool.close()
