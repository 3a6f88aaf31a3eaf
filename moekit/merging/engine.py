"""Runs a plan: for each output tensor, read its inputs, apply the method, write the result, free everything.

Reads for the next piece of work are issued on a background thread while the current one computes (file reads and
torch kernels both release the GIL), so disk and arithmetic overlap. Elementwise methods are streamed in row
chunks, which bounds peak memory by the chunk size rather than by the largest tensor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from moekit.errors import UserError
from moekit.merging.plan import CHUNK_ELEMENTS, Job, Plan, TensorRef, compute_dtype_for

log = logging.getLogger("moekit")


@dataclass
class Piece:
    """One unit of work: a whole job, or rows [a, b) of an elementwise job."""

    job: Job
    rows: tuple[int, int] | None
    last: bool  # the last piece of its job


def pieces(plan: Plan) -> Iterator[Piece]:
    for job in plan.jobs:
        shape = job.out.shape
        numel = math.prod(shape)
        if plan.method.elementwise and len(shape) >= 1 and numel > CHUNK_ELEMENTS and shape[0] > 1:
            step = max(1, CHUNK_ELEMENTS // max(1, numel // shape[0]))
            for a in range(0, shape[0], step):
                b = min(shape[0], a + step)
                yield Piece(job, (a, b), b == shape[0])
        else:
            yield Piece(job, None, True)


class MergeRunner:
    """Executes a plan into a ShardedWriter-like sink."""

    def __init__(self, plan: Plan, seed: int = 0, allow_nonfinite: bool = False, on_progress: Callable[[Job], None] | None = None):
        self.plan = plan
        self.allow_nonfinite = allow_nonfinite
        self.on_progress = on_progress or (lambda job: None)
        self.rng = torch.Generator().manual_seed(seed)
        self._warned: set[str] = set()

    def read(self, ref: TensorRef, rows: tuple[int, int] | None) -> torch.Tensor:
        model = self.plan.models[ref.model]
        x = model.tensors.read(ref.name, rows)
        cfg = self.plan.config
        if cfg.dtype is not None and x.dtype != cfg.dtype:
            x = x.to(cfg.dtype)  # mergekit casts inputs to `dtype` first: keep its rounding
        x = x.to(compute_dtype_for(self.plan, x.dtype))
        if x.is_floating_point() and not torch.isfinite(x).all():
            key = f"{model.ref}:{ref.name}"
            if key not in self._warned:
                self._warned.add(key)
                log.warning("input tensor '%s' of '%s' holds NaN or Inf values", ref.name, model.ref)
        return x

    def read_piece(self, piece: Piece) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        inputs = [self.read(r, piece.rows) for r in piece.job.inputs]
        base = self.read(piece.job.base, piece.rows) if piece.job.base else None
        return inputs, base

    def compute(self, piece: Piece, inputs: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        job = piece.job
        method = self.plan.method
        kwargs = dict(job.params)
        if method.random:
            kwargs["rng"] = self.rng
        try:
            out = method.fn(inputs, base, **kwargs)
        except ValueError as e:
            raise UserError(f"tensor '{job.out.name}': {method.name}: {e}") from None
        if not self.allow_nonfinite and out.is_floating_point() and not torch.isfinite(out).all():
            raise UserError(
                f"tensor '{job.out.name}': the merge produced NaN or Inf values; check the inputs and parameters "
                "(or pass --allow-nonfinite to write them anyway)"
            )
        return out.to(job.out.dtype)

    def run(self, write: Callable[[Job, torch.Tensor, bool], None]) -> None:
        """Compute every piece in plan order and hand it to `write(job, tensor, is_last_piece)`."""
        work = list(pieces(self.plan))
        if not work:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-read") as pool:
            pending = pool.submit(self.read_piece, work[0])
            for i, piece in enumerate(work):
                inputs, base = pending.result()
                if i + 1 < len(work):
                    pending = pool.submit(self.read_piece, work[i + 1])
                out = self.compute(piece, inputs, base)
                del inputs, base
                write(piece.job, out, piece.last)
                if piece.last:
                    self.on_progress(piece.job)
