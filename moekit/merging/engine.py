"""Runs a plan (a dense merge's or an MoE build's): for each output tensor, read its inputs, apply its
operation, check and cast the result, write it, free everything; or, for a dry run, describes the plan.

Reads for the next piece of work are issued on a background thread while the current one computes (file reads and
torch kernels both release the GIL), so disk and arithmetic overlap. A second thread draws the random numbers that a
random method declares (`draws`), strictly in plan order and ahead of use, so the generator's serial loop overlaps
both.
Elementwise operations are streamed in row chunks, which bounds peak memory by the chunk size rather than by the
largest tensor. Consecutive jobs of an operation that leaves its inputs alone (an MoE's experts copied from one
MLP) read them once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.errors import UserError
from moekit.io.output_dir import (
    check_free_space,
    check_output_free,
    check_output_spares_inputs,
    output_lock,
    resolve_out,
)
from moekit.io.output_files import write_rerun_record
from moekit.io.writer import streaming_output
from moekit.merging.job import CHUNK_ELEMENTS, PREFETCH_ELEMENTS, Job, MemoryPhase, OutputPlan, TensorRef
from moekit.merging.methods.sparsify import Uniforms
from moekit.options import MergeOptions
from moekit.progress import progress_bar

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


def pieces(plan: OutputPlan) -> Iterator[Piece]:
    for job in plan.jobs:
        shape = job.out.shape
        numel = math.prod(shape)
        permuted = job.is_embedding and plan.vocab is not None  # rows are re-laid whole, never chunked
        if (
            job.op.elementwise
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
        plan: OutputPlan,
        seed: int = 0,
        allow_nonfinite: bool = False,
        on_progress: Callable[[Job], None] | None = None,
    ):
        self.plan = plan
        self.allow_nonfinite = allow_nonfinite
        self.on_progress = on_progress or (lambda job: None)
        self.rng = torch.Generator().manual_seed(seed + plan.rng_seed_offset)
        self._warned: set[str] = set()

    def read(self, ref: TensorRef, rows: tuple[int, int] | None) -> torch.Tensor:
        x = self.plan.models[ref.model].tensors.read(ref.name, rows)
        if not x.is_floating_point():
            return x  # integers are only ever copied (the planner refuses anything else): keep them exact
        return self.plan.cast_input(x)

    def read_piece(self, piece: Piece) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        inputs = [self.read(r, piece.rows) for r in piece.job.inputs]
        base = self.read(piece.job.base, piece.rows) if piece.job.base else None
        return self.plan.align_inputs(piece.job, inputs, base)

    def compute(
        self, piece: Piece, inputs: list[torch.Tensor], base: torch.Tensor | None, uniforms: Uniforms | None
    ) -> torch.Tensor:
        job = piece.job
        kwargs = dict(job.params)
        if job.op.random:
            kwargs["rng"] = uniforms if uniforms is not None else self.rng
        try:
            out = job.op.fn(inputs, base, **kwargs)
        except ValueError as e:
            raise UserError(f"tensor '{job.out.name}': {job.op.name}: {e}") from None
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
            draws = DrawAhead(self, work, drawer) if any(p.job.op.draws for p in work) else None
            pending = kept = None  # the next piece's inputs being read; this piece's, kept for the next
            for i, piece in enumerate(work):
                drawn = draws.take() if draws is not None else None
                if pending is not None:
                    inputs, base = pending.result()
                elif kept is not None:
                    inputs, base = kept
                else:
                    inputs, base = self.read_piece(piece)
                pending = kept = None
                following = work[i + 1] if i + 1 < len(work) else None
                if following is not None and reads_same(piece, following):
                    kept = inputs, base
                elif following is not None and following.numel <= PREFETCH_ELEMENTS:
                    pending = reader.submit(self.read_piece, following)
                uniforms = drawn.result() if drawn is not None else None
                out = self.compute(piece, inputs, base, uniforms)
                # only the output (and the inputs kept for the next piece) stay alive through the write
                del inputs, base, drawn, uniforms
                write(piece.job, out, piece.last)
                if piece.last:
                    self.on_progress(piece.job)


def reads_same(piece: Piece, following: Piece) -> bool:
    """Both pieces read the same input rows, and the first one's operation leaves its inputs as they are
    (a merge method may overwrite them), so the second can take them without reading them again."""
    a, b = piece.job, following.job
    return (
        getattr(a.op, "keeps_inputs", False)
        and bool(a.inputs)
        and (a.inputs, a.base, piece.rows) == (b.inputs, b.base, following.rows)
    )


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
            shapes = job.op.draws(job.params, job.out.shape) if job.op.draws is not None else []
            size = sum(map(math.prod, shapes))
            if self.queue and self.ahead + size > DRAW_AHEAD_ELEMENTS:
                return
            self.queue.append((self.pool.submit(Uniforms, self.runner.rng, shapes), size))
            self.ahead += size
            self.submitted += 1


def run_plan(
    cfg,
    build: Callable[..., OutputPlan],
    out: str | Path | None,
    options: MergeOptions,
    write_metadata: Callable[[OutputPlan, Path], None],
    print_fn: Callable[[str], None] = print,
) -> Path | None:
    """Plan a parsed config (`build(cfg, options)`), then describe the plan (dry run) or execute it into `out`
    (or the config's `out:`), with `write_metadata(plan, dir)` adding what goes around the weights.

    The output is checked free before the (slow) planning, and checked not to hold an input after it, so nothing
    is read for a run that would be refused anyway; a real run holds the output's lock from the first check to
    the end. Returns the output path, or None for a dry run."""
    out_path = resolve_out(out, cfg.out, cfg.base_dir)
    with contextlib.nullcontext() if options.dry_run else output_lock(out_path):
        if not options.dry_run:
            check_output_free(out_path, options.force)
        plan = build(cfg, options)
        try:
            check_output_spares_inputs(out_path, [m.path for m in plan.models])
            check_free_space(out_path, plan.output_bytes)
            for warning in plan.warnings:
                log.warning(warning)
            if options.dry_run:
                describe_plan(plan, out_path, print_fn, options)
                return None
            plan.prepare(options)
            execute(plan, out_path, options, write_metadata)
        finally:
            plan.close()
    return out_path


def execute(
    plan: OutputPlan, out: Path, options: MergeOptions, write_metadata: Callable[[OutputPlan, Path], None]
) -> None:
    """Every output tensor computed and streamed into the shards of a temporary directory, then the metadata;
    the directory becomes `out` only when all of it is written."""
    with streaming_output(out, options.force, plan.written_tensors(), options.shard_size) as (tmp, writer):
        with progress_bar(plan.progress_label, plan.output_bytes, options.progress, "bytes") as advance:
            runner = MergeRunner(
                plan,
                seed=options.seed,
                allow_nonfinite=options.allow_nonfinite,
                on_progress=lambda job: advance(job.out.nbytes),
            )
            runner.run(lambda job, tensor, last: plan.write(writer, job, tensor, last))
        write_metadata(plan, tmp)
        write_rerun_record(tmp, out, plan.config.base_dir, options)


def describe_plan(
    plan: OutputPlan, out: Path, print_fn: Callable[[str], None] = print, options: MergeOptions | None = None
) -> None:
    """The dry-run report: every output tensor with where it comes from, the size, and the memory estimate."""
    for line in plan.describe(out):
        print_fn(line)
    for job in summarised(plan.jobs, print_fn):
        dtype = str(job.out.dtype).removeprefix("torch.")
        print_fn(f"  {job.out.name} {list(job.out.shape)} {dtype} <- {plan.describe_job(job)}")
    print_fn(f"output: {len(plan.jobs)} tensors, {plan.output_bytes / GIB:.3f} GiB")
    for line in describe_memory(plan, options or MergeOptions()):
        print_fn(line)
    for line in plan.describe_after():
        print_fn(line)
    print_fn("dry run: nothing was written")


GIB = 1024**3


def describe_memory(plan: OutputPlan, options: MergeOptions) -> list[str]:
    """The estimate of the run's peak resident memory: the process as planning leaves it (measured: a real run
    plans the same way first), plus the peak of the phase that holds most; then the other phases' peaks."""
    process = process_resident_bytes()
    phases = [*plan.memory_before_writing(options), stream_memory(plan)]
    peak = max(phases, key=lambda p: p.total)
    lines = [
        f"peak memory estimate: {(process + peak.total) / GIB:.3f} GiB, while {peak.name}:",
        f"  {process / GIB:.3f} GiB this process after planning (measured: python, torch, headers, tokenizers)",
    ]
    lines += [f"  + {n / GIB:.3f} GiB {what}" for what, n in peak.parts if n]
    lines += [
        f"  other phase: {p.name}: {(process + p.total) / GIB:.3f} GiB" for p in phases if p is not peak
    ]
    return lines


def process_resident_bytes() -> int:
    """This process's resident memory now (Linux), else its peak so far."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
        return peak if sys.platform == "darwin" else peak * 1024


def stream_memory(plan: OutputPlan) -> MemoryPhase:
    """The write phase at its peak, piece by piece as MergeRunner.run holds them: the piece's inputs (or, while
    they are read, the read's peak), the operation's working memory and output, the next piece's inputs when
    they are read ahead, the previous piece's output (still referenced until the next one replaces it), and
    random draws for this piece and those drawn ahead; plus what the plan holds throughout (gate vectors)."""
    work = list(pieces(plan))
    drawn = [_draw_elements(p.job) for p in work]
    always = tuple(plan.held_while_writing())
    worst: tuple[int, str, tuple[tuple[str, int], ...]] = (0, "writing the tensors", always)
    previous_out = 0
    read_here = True  # the piece's inputs are read on the main thread (neither read ahead nor kept)
    ahead_end, ahead = 0, 0  # the pieces [i + 1, ahead_end) drawn ahead, and their element count
    for i, piece in enumerate(work):
        held, read_peak = plan.input_bytes(piece.job, piece.rows)
        following = work[i + 1] if i + 1 < len(work) else None
        keep = following is not None and reads_same(piece, following)
        prefetch = following is not None and not keep and following.numel <= PREFETCH_ELEMENTS
        if ahead_end <= i:
            ahead_end, ahead = i + 1, 0
        else:
            ahead -= drawn[i]
        while ahead_end < len(work) and (
            ahead_end == i + 1 or ahead + drawn[ahead_end] <= DRAW_AHEAD_ELEMENTS
        ):
            ahead += drawn[ahead_end]
            ahead_end += 1
        common = always + (
            ("the previous tensor's output", previous_out),
            ("random draws for this tensor and those drawn ahead", 4 * (drawn[i] + ahead)),
        )
        candidates = [
            common
            + (
                (f"inputs of '{piece.job.out.name}'", held),
                ("its operation's working memory and output", plan.scratch_bytes(piece.job, piece.numel)),
                ("the next tensor's inputs, read ahead", plan.input_bytes(following.job, following.rows)[1])
                if prefetch
                else ("", 0),
            )
        ]
        if read_here:
            relaid = " and re-laying them in the output's token order" * (
                piece.job.is_embedding and plan.vocab is not None
            )
            candidates.append(
                common + ((f"reading the inputs of '{piece.job.out.name}'{relaid}", read_peak),)
            )
        for parts in candidates:
            total = sum(n for _, n in parts)
            if total > worst[0]:
                worst = (total, "writing the tensors", parts)
        previous_out = piece.numel * piece.job.out.dtype.itemsize
        read_here = not keep and not prefetch
    return MemoryPhase(worst[1], tuple(p for p in worst[2] if p[1]))


def _draw_elements(job: Job) -> int:
    return sum(map(math.prod, job.op.draws(job.params, job.out.shape))) if job.op.draws is not None else 0


PLAN_LINES = 60  # a dry run lists this many output tensors at most: the first ones, a count, the last ones


def summarised(jobs: list[Job], print_fn: Callable[[str], None]) -> Iterator[Job]:
    """The jobs a dry run lists one by one; for a long plan, the first and last few, with one line saying how
    many are left out in between (a million-tensor plan must not print a million lines)."""
    if len(jobs) <= PLAN_LINES:
        yield from jobs
        return
    head, tail = jobs[: PLAN_LINES - 10], jobs[-10:]
    yield from head
    print_fn(f"  ... {len(jobs) - len(head) - len(tail)} more tensors like these ...")
    yield from tail
