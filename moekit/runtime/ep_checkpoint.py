"""Load one rank's experts of an MoE checkpoint, reading only those experts' tensors.

Checkpoints come in two expert layouts, both read here:
- per-expert (what `moekit merge` and `save_pretrained` write, and what the hub holds):
  Mixtral `model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight` (gate, up, down) and
  Qwen-MoE `model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`;
- fused (transformers 5 in memory, mergekit-moe on disk): `...experts.gate_up_proj` [E, 2I, H] and
  `...experts.down_proj` [E, H, I], from which only this rank's rows of dimension 0 are read.
The result is always the fused in-memory layout of this rank's block: gate_up [E_local, 2I, H] (gate rows,
then up rows) and down [E_local, H, I].
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekit.errors import UserError
from moekit.io.safetensors_reader import TensorReader
from moekit.runtime.expert_parallel import local_experts

# Where a layer's MoE block lives in a checkpoint: Mixtral's hub name first, then transformers 5 / Qwen's.
_BLOCK_NAMES = ("block_sparse_moe", "mlp")
# Per-expert tensor names (gate, up, down) by family.
_PER_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


class LocalExperts(NamedTuple):
    """This rank's experts of one layer, in transformers' fused layout, in the checkpoint's dtype."""

    gate_up_proj: torch.Tensor  # [E_local, 2I, H]
    down_proj: torch.Tensor  # [E_local, H, I]
    experts: range  # their global ids


def load_local_experts(
    reader: TensorReader, layer: int, num_experts: int, rank: int, world_size: int
) -> LocalExperts:
    """Read layer `layer`'s experts `local_experts(num_experts, rank, world_size)` and nothing else."""
    ids = local_experts(num_experts, rank, world_size)
    for block in _BLOCK_NAMES:
        prefix = f"model.layers.{layer}.{block}.experts."
        if f"{prefix}gate_up_proj" in reader:
            _check_expert_count(reader, f"{prefix}gate_up_proj", num_experts)
            rows = (ids.start, ids.stop)
            gate_up = reader.read(f"{prefix}gate_up_proj", rows=rows)
            return LocalExperts(gate_up, reader.read(f"{prefix}down_proj", rows=rows), ids)
        for gate, up, down in _PER_EXPERT_NAMES:
            if f"{prefix}0.{gate}.weight" not in reader:
                continue
            last = f"{prefix}{num_experts - 1}.{gate}.weight"
            if last not in reader or f"{prefix}{num_experts}.{gate}.weight" in reader:
                raise UserError(
                    f"layer {layer}: the checkpoint's experts under '{prefix}' do not number {num_experts} as "
                    "config.json says; fix num_local_experts / num_experts in config.json"
                )
            gate_up = [
                torch.cat([_read(reader, f"{prefix}{e}.{name}.weight") for name in (gate, up)]) for e in ids
            ]
            down = [_read(reader, f"{prefix}{e}.{down}.weight") for e in ids]
            return LocalExperts(torch.stack(gate_up), torch.stack(down), ids)
    raise UserError(
        f"layer {layer}: no MoE experts in the checkpoint (looked for model.layers.{layer}.block_sparse_moe.experts.* "
        f"and model.layers.{layer}.mlp.experts.*); is this a Mixtral or Qwen-MoE checkpoint?"
    )


def _read(reader: TensorReader, name: str) -> torch.Tensor:
    if name not in reader:
        raise UserError(f"checkpoint: tensor '{name}' is missing; the checkpoint is incomplete")
    return reader.read(name)


def _check_expert_count(reader: TensorReader, name: str, num_experts: int) -> None:
    stored = reader.infos[name].shape[0]
    if stored != num_experts:
        raise UserError(
            f"checkpoint: '{name}' holds {stored} experts but config.json says {num_experts}; fix config.json"
        )


def checkpoint_name(model_key: str, reader: TensorReader) -> str:
    """The checkpoint tensor that fills transformers 5 parameter `model_key` (Mixtral's hub files say
    `block_sparse_moe` where transformers 5 says `mlp`)."""
    if model_key in reader:
        return model_key
    legacy = model_key.replace(".mlp.", ".block_sparse_moe.", 1)
    if legacy in reader:
        return legacy
    raise UserError(
        f"checkpoint: no tensor for the model's '{model_key}' (nor '{legacy}'); the checkpoint is incomplete"
    )
