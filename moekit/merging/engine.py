"""Runs a plan: for each output tensor, read its inputs, apply the method, write the result, free everything.

Reads for the next piece of work are issued on a background thread while the current one computes (file reads and
torch kernels both release the GIL), so disk and arithmetic overlap. A second thread draws the random numbers that a
random method declares (`draws`), strictly in plan order and ahead of use, so the generator's serial loop overlaps
both.
Elementwise methods are streamed in row chunks, which bounds peak memory by the chunk size rather than by the
largest tensor.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from moekit.errors import UserError
from moekit.merging.methods.sparsify import Uniforms
from moekit.merging.plan import CHUNK_ELEMENTS, PREFETCH_ELEMENTS, Job, Plan, TensorRef, compute_dtype_for

log = logging.getLogger("moekit")

DRAW_AHEAD_ELEMENTS = 16 * CHUNK_ELEMENTS  # random numbers drawn ahead of the compute: 64 MB of fp32


@dataclass
class Piece:
    """One unit of work: a whole job, or rows [a, b) of an elementwise job."""

    job: Job
    rows: tuple[int, int] | None
    last: bool  # the last piece of its job

    @property
    def numel(self) -> int:
        n = math.prod(self.job.out.shape)
        if self.rows is not None:
            n = n // self.job.out.shape[0] * (self.rows[1] - self.rows[0])
        return n


def pieces(plan: Plan) -> Iterator[Piece]:
    for job in plan.jobs:
        shape = job.out.shape
        numel = math.prod(shape)
        permuted = job.is_embedding and plan.vocab is not None  # rows are re-laid whole, never chunked
        if (
            plan.method.elementwise
            and not permuted
            and len(shape) >= 1
            and numel > CHUNK_ELEMENTS
            and shape[0] > 1
        ):
            step = max(1, CHUNK_ELEMENTS // max(1, numel // shape[0]))
            for a in range(0, shape[0], step):
                b = min(shape[0], a + step)
                yield Piece(job, (a, b), b == shape[0])
        else:
            yield Piece(job, None, True)


def all_finite(x: torch.Tensor) -> bool:
    """True when x has no NaN/Inf. A sum in x's own dtype is one pass with no copy (a float64 sum would
    materialise a float64 copy of x); only when it is not finite (NaN, Inf, or an overflowing sum) do we pay for
    the exact elementwise check."""
    if not x.is_floating_point():
        return True
    if x.element_size() == 1:
        x = x.to(torch.float16)  # torch has no sum or isfinite for float8; float16 holds every float8 value
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


# Float8 formats without an infinity: torch's cast saturates at their largest value instead of overflowing.
SATURATING = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


def fits(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """False when finite x holds values that a cast to the saturating `dtype` would clamp (past its largest value
    by more than half a unit in the last place, where rounding ends)."""
    if dtype not in SATURATING or x.numel() == 0:
        return True
    info = torch.finfo(dtype)
    bound = info.max + info.eps * 2.0 ** math.floor(math.log2(info.max)) / 2
    low, high = torch.aminmax(x)
    return bool(high < bound) and bool(low > -bound)


class MergeRunner:
    """Executes a plan into a ShardedWriter-like sink."""

    def __init__(
        self,
        plan: Plan,
        seed: int = 0,
        allow_nonfinite: bool = False,
        on_progress: Callable[[Job], None] | None = None,
    ):
        self.plan = plan
        self.allow_nonfinite = allow_nonfinite
        self.on_progress = on_progress or (lambda job: None)
        self.rng = torch.Generator().manual_seed(seed)
        self._warned: set[str] = set()

    def read(self, ref: TensorRef, rows: tuple[int, int] | None) -> torch.Tensor:
        model = self.plan.models[ref.model]
        x = model.tensors.read(ref.name, rows)
        if not x.is_floating_point():
            return x  # integers are only ever copied (the planner refuses anything else): keep them exact
        cfg = self.plan.config
        if cfg.dtype is not None and x.dtype != cfg.dtype:
            x = x.to(cfg.dtype)  # mergekit casts inputs to `dtype` first: keep its rounding
        return x.to(compute_dtype_for(self.plan, x.dtype))

    def read_piece(self, piece: Piece) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        inputs = [self.read(r, piece.rows) for r in piece.job.inputs]
        base = self.read(piece.job.base, piece.rows) if piece.job.base else None
        if piece.job.is_embedding and self.plan.vocab is not None:
            return self.permute_vocabulary(piece.job, inputs, base)
        return inputs, base

    def permute_vocabulary(self, job: Job, inputs: list[torch.Tensor], base: torch.Tensor | None):
        """Each input's rows re-laid in the output vocabulary's order (tokenizer_source; see tokenizer.py)."""
        refs = job.inputs + ([job.base] if job.base else [])
        stored = [self.plan.models[r.model].tensors.infos[r.name].dtype for r in refs]
        hold = self.plan.config.dtype or functools.reduce(torch.promote_types, stored)
        tensors = inputs + ([base] if base is not None else [])
        out = self.plan.vocab.permute(tensors, [r.model for r in refs], hold)
        return out[: len(inputs)], (out[-1] if base is not None else None)

    def compute(
        self, piece: Piece, inputs: list[torch.Tensor], base: torch.Tensor | None, uniforms: Uniforms | None
    ) -> torch.Tensor:
        job = piece.job
        method = self.plan.method
        kwargs = dict(job.params)
        if method.random:
            kwargs["rng"] = uniforms if uniforms is not None else self.rng
        try:
            out = method.fn(inputs, base, **kwargs)
        except ValueError as e:
            raise UserError(f"tensor '{job.out.name}': {method.name}: {e}") from None
        if uniforms is not None:
            uniforms.check_used()
        # Checked after the cast to the output dtype too: finite float32 values may not fit float16 or float8.
        written = out.to(job.out.dtype)
        if (
            out.is_floating_point()
            and all_finite(out)
            and not (all_finite(written) and fits(out, written.dtype))
        ):
            self._out_of_range(job, out)
        elif out.is_floating_point() and not all_finite(out):
            inputs, base = self.read_piece(piece)  # afresh: the method may have overwritten its inputs
            bad_inputs = [
                self._describe(r)
                for r, x in zip(job.inputs + [job.base], inputs + [base])
                if r and not all_finite(x)
            ]
            if not self.allow_nonfinite:  # the error names the input: no warning, so stderr stays one line
                cause = f" (from NaN/Inf in input {bad_inputs[0]})" if bad_inputs else ""
                raise UserError(
                    f"tensor '{job.out.name}': the merge produced NaN or Inf values{cause}; fix the inputs or "
                    "parameters, or pass --allow-nonfinite to write them anyway"
                )
            for what in bad_inputs:
                if what not in self._warned:
                    self._warned.add(what)
                    log.warning("input %s holds NaN or Inf values", what)
        return written

    def _out_of_range(self, job: Job, out: torch.Tensor) -> None:
        dtype = str(job.out.dtype).removeprefix("torch.")
        largest = f"{torch.finfo(job.out.dtype).max:g}"
        what = f"tensor '{job.out.name}': merged values up to {float(out.abs().max()):.4g} do not fit {dtype}"
        if not self.allow_nonfinite:
            raise UserError(
                f"{what} (largest {largest}), the output dtype; set out_dtype: float32 (or bfloat16), or pass "
                "--allow-nonfinite to write them anyway"
            )
        if job.out.name not in self._warned:
            self._warned.add(job.out.name)
            log.warning("%s (largest %s): written as Inf or clamped", what, largest)

    def _describe(self, ref: TensorRef) -> str:
        return f"tensor '{ref.name}' of '{self.plan.models[ref.model].ref}'"

    def run(self, write: Callable[[Job, torch.Tensor, bool], None]) -> None:
        """Compute every piece in plan order and hand it to `write(job, tensor, is_last_piece)`."""
        work = list(pieces(self.plan))
        with (
            background_thread("moekit-read") as reader,
            background_thread("moekit-draw") as drawer,
        ):
            draws = DrawAhead(self, work, drawer) if self.plan.method.draws is not None else None
            pending = None
            for i, piece in enumerate(work):
                drawn = draws.take() if draws is not None else None
                inputs, base = pending.result() if pending is not None else self.read_piece(piece)
                pending = None
                if i + 1 < len(work) and work[i + 1].numel <= PREFETCH_ELEMENTS:
                    pending = reader.submit(self.read_piece, work[i + 1])
                uniforms = drawn.result() if drawn is not None else None
                out = self.compute(piece, inputs, base, uniforms)
                del inputs, base, drawn, uniforms  # only the output stays alive through the write
                write(piece.job, out, piece.last)
                if piece.last:
                    self.on_progress(piece.job)


@contextlib.contextmanager
def background_thread(name: str) -> Iterator[ThreadPoolExecutor]:
    """One worker thread; work still queued when the run fails is dropped, not done."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class DrawAhead:
    """A random method's declared draws, made on their own thread in plan order, ahead of the compute.

    torch's generator is a serial loop (~6 ns a number here) and a DARE merge draws one number per element per
    model: it is the merge's longest single chain of work, so it should never wait for reads or arithmetic. It
    runs up to DRAW_AHEAD_ELEMENTS numbers ahead of the piece being computed (always at least the next piece),
    which bounds the memory that drawn-but-unused numbers hold.
    """

    def __init__(self, runner: MergeRunner, work: list[Piece], pool: ThreadPoolExecutor):
        self.runner, self.work, self.pool = runner, work, pool
        # (future Uniforms, their element count) of the pieces drawn for but not yet taken, in plan order
        self.queue: deque[tuple[Future, int]] = deque()
        self.submitted = self.ahead = 0

    def take(self) -> Future:
        """The future Uniforms of the next piece (pieces are taken in plan order)."""
        self._fill()
        future, size = self.queue.popleft()
        self.ahead -= size
        self._fill()
        return future

    def _fill(self) -> None:
        while self.submitted < len(self.work):
            job = self.work[self.submitted].job
            shapes = self.runner.plan.method.draws(job.params, job.out.shape)
            size = sum(map(math.prod, shapes))
            if self.queue and self.ahead + size > DRAW_AHEAD_ELEMENTS:
                return
            self.queue.append((self.pool.submit(Uniforms, self.runner.rng, shapes), size))
            self.ahead += size
            self.submitted += 1
