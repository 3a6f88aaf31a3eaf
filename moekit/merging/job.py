"""What a planner hands the executor: one job per output tensor, and the plan around them.

Dense merges (merging/plan.py) and MoE builds (moe/build.py) both produce an `OutputPlan`: a list of jobs in
write order, each naming its output tensor (name, dtype, shape), the input tensors that feed it, and the
operation that computes it from them: a registered merge method for a dense merge, a copy, an expert's noise
and scale or a router's gate vectors for an MoE build. Nothing here reads tensor data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.io.writer import OutputTensor, ShardedWriter

if TYPE_CHECKING:
    import torch

    from moekit.io.checkpoint import Checkpoint
    from moekit.merging.registry import MergeMethod
    from moekit.options import MergeOptions

CHUNK_ELEMENTS = 1024 * 1024  # rows per chunk for elementwise operations are chosen to stay under this
# The next piece is read ahead only when its inputs are this small: reading a big one early would double the peak.
PREFETCH_ELEMENTS = 2 * CHUNK_ELEMENTS


@dataclass(frozen=True)
class TensorOp:
    """How a job's output is computed, `fn(inputs, base, **params)`, when that is not a registered merge method
    (registry.MergeMethod, which has these fields too and may overwrite its inputs): the MoE builder's copies,
    experts and routers. These leave their inputs as they are, so consecutive jobs with the same inputs share
    one read of them."""

    name: str
    fn: Callable[..., Any]
    elementwise: bool = False  # output[i] depends only on inputs[i]: the executor may stream row chunks
    random: bool = False  # takes `rng`, the run's torch.Generator
    draws: None = None  # a merge method's declared draws (see registry.MergeMethod)
    keeps_inputs: bool = True


@dataclass(frozen=True)
class MemoryPhase:
    """One phase of a run, at its peak: what it holds on top of the process as planning leaves it."""

    name: str  # "computing the router gates", ...
    parts: tuple[tuple[str, int], ...]  # (what, bytes)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)


@dataclass(frozen=True)
class TensorRef:
    model: int  # index into the plan's models
    name: str


@dataclass
class Job:
    out: OutputTensor
    op: MergeMethod | TensorOp
    inputs: list[TensorRef]
    base: TensorRef | None = None
    # resolved for this tensor; per-model parameters are lists aligned with `inputs`
    params: dict[str, Any] = field(default_factory=dict)
    is_embedding: bool = False  # its rows follow the vocabulary (re-laid whole when the plan has one)


class OutputPlan:
    """The part of a plan the executor and the dry run use. A planner fills `jobs` and `models`, and says what
    its jobs read and what goes around the weights."""

    jobs: list[Job]
    models: list[Checkpoint]
    config: object  # the parsed config; its `base_dir` is where the config's relative paths resolved
    vocab = None  # a dense merge's tokenizer_source: embedding inputs are re-laid in its token order
    rng_seed_offset = 0  # the run's generator is seeded with `seed + rng_seed_offset`
    warnings: tuple[str, ...] | list[str] = ()  # printed on stderr before the run
    progress_label = "merging"

    @property
    def output_tensors(self) -> list[OutputTensor]:
        return [j.out for j in self.jobs]

    @property
    def output_bytes(self) -> int:
        return sum(j.out.nbytes for j in self.jobs)

    def written_tensors(self) -> list[OutputTensor]:
        """The tensors as the output files hold them, which the writer lays its shards out by."""
        return self.output_tensors

    def write(self, writer: ShardedWriter, job: Job, tensor: torch.Tensor, last: bool) -> None:
        """Hand a job's output (or a row chunk of it) to the writer."""
        writer.write(job.out.name, tensor, last)

    def cast_input(self, x: torch.Tensor) -> torch.Tensor:
        """An input tensor as read from disk -> as the operation receives it."""
        return x

    def align_inputs(
        self, job: Job, inputs: list[torch.Tensor], base: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """One job's inputs, each cast by cast_input -> as the operation receives them together."""
        return inputs, base

    def prepare(self, options: MergeOptions) -> None:
        """Work done after the checks and before the first output tensor (the MoE builder's gates)."""

    def input_bytes(self, job: Job, rows: tuple[int, int] | None) -> tuple[int, int]:
        """(bytes of a piece's inputs as the operation receives them, peak bytes while reading them): each input
        is read in its stored dtype and then cast (cast_input), one at a time."""
        held = peak = 0
        for ref in job.inputs + ([job.base] if job.base else []):
            info = self.models[ref.model].tensors.infos[ref.name]
            numel = math.prod(info.shape)
            if rows is not None:
                numel = numel // info.shape[0] * (rows[1] - rows[0])
            stored = numel * info.dtype.itemsize
            cast = numel * self.input_dtype(info.dtype).itemsize
            peak = max(peak, held + stored + (cast if cast != stored else 0))
            held += cast
        return held, max(peak, held)

    def input_dtype(self, stored: torch.dtype) -> torch.dtype:
        """The dtype cast_input gives an input stored in `stored`."""
        return stored

    def scratch_bytes(self, job: Job, numel: int) -> int:
        """Bytes a job's operation allocates for `numel` output elements (a row chunk or the whole tensor),
        its output and the output's cast to the output dtype included."""
        raise NotImplementedError

    def memory_before_writing(self, options: MergeOptions) -> list[MemoryPhase]:
        """The phases of a run before its first output tensor (prepare), each at its peak."""
        return []

    def held_while_writing(self) -> list[tuple[str, int]]:
        """What the plan holds through the whole write, besides the tensors in flight: (what, bytes)."""
        return []

    def describe(self, out: Path) -> list[str]:
        """The dry run's lines before the list of tensors."""
        raise NotImplementedError

    def describe_job(self, job: Job) -> str:
        """Where a job's output comes from, for the dry run."""
        raise NotImplementedError

    def describe_after(self) -> list[str]:
        """The dry run's lines after the memory estimate."""
        return []

    def close(self) -> None:
        for m in self.models:
            m.close()
