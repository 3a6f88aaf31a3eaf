"""MoE experts merged as transformers 5 (and so mergekit 0.1.5) holds them: one stacked tensor per layer.

On disk, Mixtral and Qwen-MoE checkpoints keep one tensor per expert and projection (`experts.3.w1.weight`, the
layout `save_pretrained` writes). transformers 5 loads them stacked: `experts.gate_up_proj` [E, 2I, H] (each
expert's gate rows, then its up rows) and `experts.down_proj` [E, H, I] (its conversion_mapping), and mergekit
0.1.5 merges those stacked tensors as single tensors. For every method that is not elementwise (slerp's angle,
TIES's top-k, DARE's draws, ...) the result depends on that grouping, so a merge of such checkpoints reads the
experts through `StackedExperts`, which shows each layer's experts as the stacked tensors, and `Unstacking` writes
each merged stack back as the per-expert tensors the reference model stores. Elementwise methods give the same
numbers either way and keep their per-expert, row-chunked streaming.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from moekit.architectures import Family
from moekit.errors import UserError
from moekit.io.checkpoint import Checkpoint
from moekit.io.safetensors_reader import CheckpointReader, TensorInfo
from moekit.io.writer import OutputTensor


@dataclass(frozen=True)
class Stack:
    stacked: str  # the name inside a layer that transformers 5 gives the stack
    parts: tuple[
        str, ...
    ]  # per-expert names inside a layer, `{e}` for the expert, concatenated in this order


@dataclass(frozen=True)
class ExpertLayout:
    renames: tuple[tuple[str, str], ...]  # (stored, transformers 5) name fragments, for the other MoE tensors
    stacks: tuple[Stack, ...]


_GATE_UP_DOWN = (
    Stack("mlp.experts.gate_up_proj", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight")),
    Stack("mlp.experts.down_proj", ("mlp.experts.{e}.down_proj.weight",)),
)
_W1_W3_W2 = (
    Stack(
        "mlp.experts.gate_up_proj",
        ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight"),
    ),
    Stack("mlp.experts.down_proj", ("block_sparse_moe.experts.{e}.w2.weight",)),
)
_QWEN_MOE = ExpertLayout((), _GATE_UP_DOWN)
# By model_type: transformers 5's conversion_mapping for these types, written out (a test checks it against what
# transformers loads). Renames apply in order, to whole names. The stacks are listed in the order mergekit merges
# them (its architecture file's, else the model's parameter order), which its random methods draw in.
LAYOUTS: dict[str, ExpertLayout] = {
    "mixtral": ExpertLayout(((".block_sparse_moe.", ".mlp."),), _W1_W3_W2),
    "phimoe": ExpertLayout(((".block_sparse_moe.", ".mlp."), (".gate.weight", ".router.weight")), _W1_W3_W2),
    "qwen2_moe": _QWEN_MOE,
    "qwen3_moe": ExpertLayout((), _GATE_UP_DOWN[::-1]),
    "olmoe": _QWEN_MOE,
    "deepseek_v2": _QWEN_MOE,
    "deepseek_v3": _QWEN_MOE,
    "glm4_moe": _QWEN_MOE,
    "ernie4_5_moe": ExpertLayout(
        (("mlp.moe_statics.e_score_correction_bias", "mlp.gate.moe_statics.e_score_correction_bias"),),
        _GATE_UP_DOWN,
    ),
}


def _part_pattern(part: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(part).replace(re.escape("{e}"), r"(\d+)") + "$")


class StackedExperts(CheckpointReader):
    """A checkpoint's tensors with each layer's per-expert tensors shown as transformers 5's stacked ones."""

    def __init__(self, base: CheckpointReader, family: Family, layout: ExpertLayout, where: str):
        self.base = base
        self.stored: dict[str, str] = {}  # shown name -> stored name, for tensors that are not stacked
        self.stacks: dict[str, list[list[str]]] = {}  # stacked name -> per expert, its stored parts in order
        self.infos: dict[str, TensorInfo] = {}
        found: dict[tuple[int, Stack], dict[int, dict[str, str]]] = {}
        patterns = [(stack, part, _part_pattern(part)) for stack in layout.stacks for part in stack.parts]
        for name, info in base.infos.items():
            loc = family.layer_of(name)
            hit = loc and next(((s, p, m) for s, p, pat in patterns if (m := pat.match(loc[1]))), None)
            if hit:
                stack, part, m = hit
                found.setdefault((loc[0], stack), {}).setdefault(int(m.group(1)), {})[part] = name
                continue
            shown = name
            for old, new in layout.renames:
                shown = shown.replace(old, new)
            self.stored[shown] = name
            self.infos[shown] = replace(info, name=shown)
        for (layer, stack), experts in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1].stacked)):
            name = family.layer_tensor(layer, stack.stacked)
            parts = []
            for e in range(len(experts)):
                missing = [p.format(e=e) for p in stack.parts if p not in experts.get(e, {})]
                if missing:
                    raise UserError(
                        f"{where}: layer {layer} has experts numbered up to {max(experts)} but no "
                        f"'{family.layer_tensor(layer, missing[0])}'; the checkpoint is incomplete"
                    )
                parts.append([experts[e][p] for p in stack.parts])
            self.stacks[name] = parts
            self.infos[name] = self._stacked_info(name, parts, where)

    def _stacked_info(self, name: str, parts: list[list[str]], where: str) -> TensorInfo:
        infos = [[self.base.infos[p] for p in expert] for expert in parts]
        first = infos[0]
        if any(len(i.shape) != 2 for expert in infos for i in expert) or any(
            [(i.dtype, i.shape) for i in expert] != [(i.dtype, i.shape) for i in first] for expert in infos
        ):
            listing = ", ".join(f"'{i.name}' {list(i.shape)}" for expert in infos[:2] for i in expert)
            raise UserError(f"{where}: the experts of '{name}' differ in shape or dtype ({listing})")
        shape = (len(parts), sum(i.shape[0] for i in first), first[0].shape[1])
        nbytes = shape[0] * shape[1] * shape[2] * first[0].dtype.itemsize
        return replace(first[0], name=name, shape=shape, start=0, end=nbytes)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        parts = self.stacks.get(name)
        if parts is None:
            return self.base.read(self.stored[name], rows)
        a, b = rows or (0, len(parts))  # rows of a stack are experts
        return torch.stack([torch.cat([self.base.read(p) for p in parts[e]]) for e in range(a, b)])

    def close(self) -> None:
        self.base.close()


def stack_experts(models: Sequence[Checkpoint], elementwise: bool) -> None:
    """Show the experts of each MoE input stacked (in place), unless the method is elementwise."""
    if elementwise:
        return
    for m in models:
        layout = LAYOUTS.get(m.config.get("model_type"))
        if layout is not None and not isinstance(m.tensors, StackedExperts):
            m.tensors = StackedExperts(m.tensors, m.family, layout, str(m.path))


class Unstacking:
    """Writes each merged stack as the per-expert tensors the reference model stores (its names, renumbered to
    the output layer), and every other tensor under the name the reference stores it by. A reference that is
    stored stacked already (a mergekit output, say) is written as stored."""

    def __init__(self, reference: Checkpoint):
        self.family = reference.family
        view = reference.tensors
        self.stacks: dict[str, tuple[str, ...]] = {}  # stacked name in a layer -> stored parts in a layer
        self.renamed: dict[str, str] = {}  # shown name (in a layer: the name inside it) -> stored name
        if not isinstance(view, StackedExperts) or not view.stacks:
            return
        layout = LAYOUTS[reference.config["model_type"]]
        self.stacks = {s.stacked: s.parts for s in layout.stacks}
        for shown, stored in view.stored.items():
            loc, stored_loc = self.family.layer_of(shown), self.family.layer_of(stored)
            key, value = (loc[1], stored_loc[1]) if loc and stored_loc else (shown, stored)
            if key != value:
                self.renamed[key] = value

    def _split(self, out: OutputTensor) -> list[tuple[str, int]] | None:
        """(stored name, rows) of each expert's parts of a stacked output tensor, in order; None if not stacked."""
        loc = self.family.layer_of(out.name)
        parts = self.stacks.get(loc[1]) if loc else None
        if parts is None:
            return None
        rows = out.shape[1] // len(parts)
        return [
            (self.family.layer_tensor(loc[0], p.format(e=e)), rows)
            for e in range(out.shape[0])
            for p in parts
        ]

    def stored_name(self, name: str) -> str:
        loc = self.family.layer_of(name)
        if loc and loc[1] in self.renamed:
            return self.family.layer_tensor(loc[0], self.renamed[loc[1]])
        return self.renamed.get(name, name)

    def outputs(self, tensors: Sequence[OutputTensor]) -> list[OutputTensor]:
        out = []
        for t in tensors:
            split = self._split(t)
            if split is None:
                out.append(replace(t, name=self.stored_name(t.name)))
            else:
                out.extend(OutputTensor(n, t.dtype, (rows, *t.shape[2:])) for n, rows in split)
        return out

    def write(self, writer, out: OutputTensor, tensor: torch.Tensor, last: bool) -> None:
        split = self._split(out)
        if split is None:
            writer.write(self.stored_name(out.name), tensor, last)
            return
        # a stacked tensor comes whole: only elementwise methods are streamed in row chunks, and they see no stacks
        pieces = tensor.reshape(-1, *tensor.shape[2:]).split([rows for _, rows in split])
        for (name, _), piece in zip(split, pieces):
            writer.write(name, piece, True)


def mergekit_order(reference: Checkpoint) -> Callable[[str], tuple]:
    """Sort key for output tensor names, in the order mergekit 0.1.5 merges them (so random methods draw as it
    does). Its scheduler orders tensors by their stored name, and a tensor it converts from the stored layout (a
    stack, or a renamed router) has none: those come first, layer by layer in the layout's order, then the rest
    by name."""
    view, family = reference.tensors, reference.family
    layout = LAYOUTS.get(reference.config.get("model_type"))
    if not isinstance(view, StackedExperts) or layout is None:
        return lambda name: (1, name)
    position = {s.stacked: i for i, s in enumerate(layout.stacks)}

    def key(name: str) -> tuple:
        loc = family.layer_of(name)
        if loc and loc[1] in position and view.stacks:
            return (0, loc[0], position[loc[1]], name)
        if view.stored.get(name, name) != name:
            return (0, loc[0] if loc else -1, len(position), name)
        return (1, name)

    return key
