"""The reader that applies the adapter of a `model+adapter` reference (mergekit's syntax; moekit.paths splits
the reference) as tensors are read.

The adapted model is never built: each tensor the merge asks for is read from the base, and when the adapter
changes it, the update is added then (for the requested rows only). Peak memory stays at one tensor plus its
two small factors, and the base and adapter files are read once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from moekit.errors import UserError
from moekit.io.safetensors_reader import CheckpointReader
from moekit.lora.adapter import LoraAdapter, lora_delta, open_adapter


class AdaptedTensors(CheckpointReader):
    """A base model's tensors with a LoRA adapter applied on read, as PEFT's merge_and_unload() would give."""

    def __init__(self, base: CheckpointReader, adapter: LoraAdapter):
        self.base = base
        self.adapter = adapter
        self.infos = dict(base.infos)
        for target, source in adapter.replacements.items():
            self.infos[target] = replace(adapter.tensors.infos[source], name=target)
        self._bias_of = {
            f"{f.module}.bias": f
            for f in adapter.factors.values()
            if f.bias is not None and adapter.lora_bias
        }
        for f in adapter.factors.values():
            _check_shape(adapter, f, self.infos[f.weight_name].shape)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        source = self.adapter.replacements.get(name)
        stored = self.adapter.tensors.read(source, rows) if source else self.base.read(name, rows)
        f = self.adapter.factors.get(name)
        if f is not None:
            return self._adapted_weight(stored, f, rows)
        f = self._bias_of.get(name)
        if f is not None:
            bias = self.adapter.tensors.read(f.bias).float()
            bias = bias if rows is None else bias[rows[0] : rows[1]]
            return (stored.float() + bias * f.scaling).to(stored.dtype)
        return stored

    def _adapted_weight(self, weight: torch.Tensor, f, rows) -> torch.Tensor:
        # PEFT loads adapter factors in fp32 (autocast_adapter_dtype) and adds the update onto the stored weight,
        # rounding once to its dtype: the same here.
        merged = weight.float() + lora_delta(self.adapter, f, rows)
        if f.magnitude is not None:
            magnitude = self.adapter.tensors.read(f.magnitude).float()
            magnitude = magnitude if rows is None else magnitude[rows[0] : rows[1]]
            merged = (magnitude / torch.linalg.norm(merged, dim=1)).view(-1, 1) * merged
        return merged.to(weight.dtype)

    def close(self) -> None:
        self.adapter.close()
        self.base.close()


def _check_shape(adapter: LoraAdapter, f, shape: tuple[int, ...]) -> None:
    infos = adapter.tensors.infos
    out_dim, in_dim = infos[f.b].shape[0], infos[f.a].shape[1]
    expected = (in_dim, out_dim) if f.embedding or adapter.fan_in_fan_out else (out_dim, in_dim)
    if tuple(shape) != expected:
        raise UserError(
            f"{adapter.path}: module '{f.module}': the LoRA update is {list(expected)} but the base tensor "
            f"'{f.weight_name}' is {list(shape)}; the adapter was trained on another model"
        )


def with_adapter(base: CheckpointReader, adapter_dir: str) -> AdaptedTensors:
    """`base` with the adapter in `adapter_dir` applied on read. Closes `base` if the adapter is refused."""
    try:
        return AdaptedTensors(base, open_adapter(Path(adapter_dir), set(base.infos)))
    except BaseException:
        base.close()
        raise
