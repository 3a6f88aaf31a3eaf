"""`MergeOptions`: how one `moekit merge` runs, as opposed to what it merges (that is the config).

The CLI and the Python API build one and pass it down to the planner and the executor; nothing reaches them
any other way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.errors import UserError

if TYPE_CHECKING:
    import torch

DEFAULT_SHARD_SIZE = 2_000_000_000


@dataclass(frozen=True)
class MergeOptions:
    force: bool = False  # replace an existing output (kept until the new one is complete)
    dry_run: bool = False  # validate and print the plan; write nothing
    shard_size: int = DEFAULT_SHARD_SIZE  # the largest output shard, in bytes
    seed: int = 0  # randomised methods (DARE, DELLA), MoE random gates and expert noise
    allow_nonfinite: bool = False  # write NaN/Inf (or values clamped by the output dtype) instead of stopping
    allow_pickle: bool = False  # load models with only pickled weights, with torch.load(weights_only=True)
    progress: bool = False  # a progress bar on stderr
    device: str = "cpu"  # where MoE hidden-state gates run; dense merges stream on the CPU
    # mergekit's output switches and its architecture check (dense merges only)
    copy_tokenizer: bool = True
    write_model_card: bool = True
    allow_crimes: bool = False
    # mergekit's --unsafe-truncate-embeddings: embeddings of different vocabulary sizes keep their common rows
    unsafe_truncate_embeddings: bool = False
    # a multi-document config's named merges go to INTERMEDIATE_DIR/NAME (None: OUT-intermediate beside OUT)
    intermediate_dir: str | Path | None = None
    # MoE hidden-state gates: the dtype the base runs in (None: the config's gate_dtype), prompts per batch
    gate_dtype: torch.dtype | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.shard_size <= 0:
            raise UserError(f"--shard-size must be a positive number of bytes, got {self.shard_size}")

    def replace(self, **changes) -> MergeOptions:
        """These options with some changed; a name that is not an option is a TypeError that names it."""
        return dataclasses.replace(self, **changes)

    @property
    def dense_only_changed(self) -> bool:
        """Any of the switches that apply to dense merges only is off its default."""
        switches = (
            self.copy_tokenizer,
            self.write_model_card,
            self.allow_crimes,
            self.unsafe_truncate_embeddings,
        )
        return switches != (True, True, False, False)
