"""The Triton kernels of the MoE experts and their launchers.

Imported lazily (through `moekit.kernels`) because `triton.jit` decides at definition time whether a kernel
runs on the GPU or on the CPU interpreter: TRITON_INTERPRET must be set before this module is imported.

Naming: an *assignment* is one (token, slot) pair of `top_k_index`, numbered `slot = token * k + j`.
`order` lists the assignments sorted by expert (indices only); `offsets[e]:offsets[e + 1]` is expert e's
range in it. Row r of a "sorted" tensor belongs to assignment `order[r]`. Every kernel has a plain-torch
twin in `moekit.kernels.reference`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the grouped GEMMs (rows of assignments x output columns x reduction)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3


# The interpreter runs one numpy op per Triton op per program: few, small programs are fastest there.
INTERPRETER_TILES = TileConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1)
# The down-projection backward writes per-column-block partial sums, so its tiles are fixed (not autotuned).
DOWN_BACKWARD_GPU_TILES = TileConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


def _gpu_autotune_configs() -> list[triton.Config]:
    """Candidates for H100-class GPUs (see kernels/README.md for the SMEM/register reasoning)."""
    shapes = [
        (16, 128, 128, 4, 4),  # decode: few rows per expert, weight-bandwidth bound
        (32, 64, 128, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 256, 64, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def interpreting() -> bool:
    """Whether kernels run on the CPU interpreter (TRITON_INTERPRET=1) rather than a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# --------------------------------------------------------------------------------------------------------
# Histogram, offsets and the expert-sorted order
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _expert_offsets_kernel(
    ids_ptr, counts_ptr, offsets_ptr, n, num_experts, BLOCK: tl.constexpr, E_PAD: tl.constexpr
):
    # One program: the histogram is tiny (E bins) and a single pass keeps it deterministic without atomics.
    bins = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + idx, mask=idx < n, other=-1)
        valid = (idx < n) & (ids >= 0) & (ids < num_experts)
        bins += tl.histogram(tl.where(valid, ids, 0), E_PAD, mask=valid)
    experts = tl.arange(0, E_PAD)
    tl.store(counts_ptr + experts, bins, mask=experts < num_experts)
    tl.store(offsets_ptr + 1 + experts, tl.cumsum(bins, 0), mask=experts < num_experts)


def expert_offsets(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert counts [E] and offsets [E + 1] (int32) of the flat expert ids; ids outside [0, E) are dropped."""
    ids = ids.reshape(-1).contiguous()
    counts = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    _expert_offsets_kernel[(1,)](
        ids, counts, offsets, ids.numel(), num_experts, BLOCK=1024, E_PAD=_next_pow2(num_experts)
    )
    return counts, offsets


@triton.jit
def _sort_by_expert_kernel(ids_ptr, offsets_ptr, order_ptr, n, BLOCK: tl.constexpr):
    # A counting sort, one program per expert: each scans the ids and writes the positions of its own
    # assignments in increasing order, so the result is stable and needs no atomics.
    expert = tl.program_id(0)
    position = tl.load(offsets_ptr + expert)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        hit = tl.load(ids_ptr + idx, mask=idx < n, other=-1) == expert
        ranks = tl.cumsum(hit.to(tl.int32), 0) - 1
        tl.store(order_ptr + position + ranks, idx, mask=hit)
        position += tl.sum(hit.to(tl.int32), 0)


def sort_by_expert(ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Assignment indices (int32 [n]) sorted stably by expert; dropped assignments leave zeros at the end."""
    ids = ids.reshape(-1).contiguous()
    order = torch.zeros(ids.numel(), dtype=torch.int32, device=ids.device)
    _sort_by_expert_kernel[(offsets.numel() - 1,)](ids, offsets, order, ids.numel(), BLOCK=1024)
    return order


# --------------------------------------------------------------------------------------------------------
# The grouped GEMM: one program per (expert, block of sorted rows) tile and block of output columns
# --------------------------------------------------------------------------------------------------------

_PLAIN, _SWIGLU, _SWIGLU_BACKWARD = 0, 1, 2


@triton.jit
def _tile_of_program(offsets_ptr, pid_m, num_experts, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    # Tiles are numbered expert after expert; program pid_m finds its expert by a cumulative sum over the
    # per-expert tile counts, so the tile list depends on BLOCK_M only here and autotuning stays free.
    experts = tl.arange(0, E_PAD)
    lo = tl.load(offsets_ptr + experts, mask=experts < num_experts, other=0)
    hi = tl.load(offsets_ptr + experts + 1, mask=experts < num_experts, other=0)
    tiles = tl.cdiv(hi - lo, BLOCK_M)
    tiles_end = tl.cumsum(tiles, 0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), 0)
    mine = experts == expert
    first_tile = tl.sum(tl.where(mine, tiles_end - tiles, 0), 0)
    row_start = tl.sum(tl.where(mine, lo, 0), 0) + (pid_m - first_tile) * BLOCK_M
    return expert, row_start, tl.sum(tl.where(mine, hi, 0), 0)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, out_ptr, order_ptr, offsets_ptr, scale_ptr, preact_ptr, partial_ptr,
    num_experts, n_out, k_dim, top_k, rows_hint,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on, stride_pm, stride_pn,
    GATHER_A: tl.constexpr, EPILOGUE: tl.constexpr, HAS_SCALE: tl.constexpr, STORE_PREACT: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # out[r] = a[row(r)] @ W[e]^T for the sorted rows r of expert e, with W[e] read through (stride_wn, stride_wk)
    # so that transposed weights need no copy. GATHER_A: a is in token order, row(r) = order[r] // k, and
    # out is sorted. Otherwise a is sorted and out[order[r]] is written (the scatter to assignment order).
    # rows_hint only keys the autotuner.
    expert, row_start, row_end = _tile_of_program(offsets_ptr, tl.program_id(0), num_experts, BLOCK_M, E_PAD)
    if expert >= num_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    slot = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    if GATHER_A:
        a_rows = slot // top_k
        out_rows = rows.to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
        out_rows = slot
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        k_ok = ks < k_dim - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter cannot do bf16 arithmetic
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        if EPILOGUE == 1:  # gate rows [0, I), up rows [I, 2I) of gate_up_proj; both share the a tile
            w_up = tl.load(w_ptrs + n_out * stride_wn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    tile_ok = row_ok[:, None] & col_ok[None, :]
    out_ptrs = out_ptr + out_rows[:, None] * stride_om + cols[None, :] * stride_on
    if EPILOGUE == 0:
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)
    elif EPILOGUE == 1:  # SwiGLU: out = silu(gate) * up
        tl.store(out_ptrs, (acc * tl.sigmoid(acc) * acc_up).to(out_ptr.dtype.element_ty), mask=tile_ok)
        if STORE_PREACT:  # kept for the backward pass
            pre_ptrs = preact_ptr + rows.to(tl.int64)[:, None] * stride_pm + cols[None, :] * stride_pn
            tl.store(pre_ptrs, acc.to(preact_ptr.dtype.element_ty), mask=tile_ok)
            tl.store(pre_ptrs + n_out * stride_pn, acc_up.to(preact_ptr.dtype.element_ty), mask=tile_ok)
    else:
        # acc = grad_out[token] @ down[e] = d(expert output)/d(h) before the routing weight. From it: the
        # routing-weight gradient <h, acc> (one partial sum per column block, summed later without atomics
        # so it stays deterministic) and the SwiGLU backward into d(gate), d(up).
        pre_ptrs = preact_ptr + rows.to(tl.int64)[:, None] * stride_pm + cols[None, :] * stride_pn
        gate = tl.load(pre_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        up = tl.load(pre_ptrs + n_out * stride_pn, mask=tile_ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        tl.store(
            partial_ptr + rows * tl.num_programs(1) + tl.program_id(1),
            tl.sum(silu * up * acc, 1),
            mask=row_ok,
        )
        d_h = acc * tl.load(scale_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        d_gate = d_h * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(out_ptrs, d_gate.to(out_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(out_ptrs + n_out * stride_on, (d_h * silu).to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _grouped_weight_grad_kernel(
    a_ptr, b_ptr, out_ptr, order_ptr, offsets_ptr, scale_ptr,
    m_dim, n_dim, top_k, rows_hint,
    stride_am, stride_ak, stride_bm, stride_bn, stride_oe, stride_om, stride_on,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # out[e] = A_e^T @ B_e: the reduction runs over expert e's sorted rows; A and B rows are either sorted or
    # gathered from token order (row order[r] // k). Experts without rows get zeros.
    expert = tl.program_id(0)
    tiles_n = tl.cdiv(n_dim, BLOCK_N)
    ms = (tl.program_id(1) // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (tl.program_id(1) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_lo = tl.load(offsets_ptr + expert)
    row_hi = tl.load(offsets_ptr + expert + 1)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(row_lo, row_hi, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_ok = rows < row_hi
        slot = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        a_rows = rows.to(tl.int64)
        b_rows = rows.to(tl.int64)
        if GATHER_A:
            a_rows = slot // top_k
        if GATHER_B:
            b_rows = slot // top_k
        a_t = tl.load(
            a_ptr + a_rows[None, :] * stride_am + ms[:, None] * stride_ak,
            mask=row_ok[None, :] & (ms < m_dim)[:, None],
            other=0.0,
        )
        if HAS_SCALE:
            scale = tl.load(scale_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
            a_t = (a_t.to(tl.float32) * scale[None, :]).to(a_ptr.dtype.element_ty)
        b = tl.load(
            b_ptr + b_rows[:, None] * stride_bm + ns[None, :] * stride_bn,
            mask=row_ok[:, None] & (ns < n_dim)[None, :],
            other=0.0,
        )
        if UPCAST:
            a_t = a_t.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a_t, b, acc, input_precision=INPUT_PRECISION)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(ms < m_dim)[:, None] & (ns < n_dim)[None, :])


_AUTOTUNED: dict = {}


def _launch(kernel, grid, args: tuple, tiles: TileConfig | None, **constexprs) -> None:
    """Run `kernel` with explicit tiles, or autotuned on a GPU, or with the interpreter's single config."""
    if tiles is None and not interpreting():
        # One tuner per kernel variant: the tuner's cache key holds the problem sizes, not the constexpr flags.
        variant = (kernel, tuple(sorted(constexprs.items())))
        if variant not in _AUTOTUNED:
            sizes = ["n_out", "k_dim"] if kernel is _grouped_gemm_kernel else ["m_dim", "n_dim"]
            key = [*sizes, "rows_hint"]
            _AUTOTUNED[variant] = triton.autotune(configs=_gpu_autotune_configs(), key=key)(kernel)
        _AUTOTUNED[variant][lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **constexprs)
        return
    t = tiles or INTERPRETER_TILES
    kernel[grid(t.block_m, t.block_n)](
        *args, **constexprs, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip


def _rows_hint(order: torch.Tensor) -> int:
    # Part of the autotune key only: decode-sized and prefill-sized batches want different tiles.
    return min(_next_pow2(order.numel()), 16384)


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 operands: exact fp32 products unless torch itself allows TF32 (its default is not to).
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def grouped_gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    *,
    gather_a: bool,
    out: torch.Tensor,
    transpose_weight: bool = False,
    scale: torch.Tensor | None = None,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """out[r] = a[row(r)] @ W[e]^T per expert tile, with W[e] = weight[e] (or weight[e]^T if transpose_weight).

    gather_a: `a` is in token order and rows are gathered inside the kernel; `out` is sorted [n, N].
    Otherwise `a` is sorted and row r is written to out[order[r]] (assignment order). `scale` (per
    assignment) multiplies each output row. Rows of `out` that no tile touches are left as they were.
    """
    w_n, w_k = (2, 1) if transpose_weight else (1, 2)
    n_out, k_dim = weight.shape[w_n], weight.shape[w_k]
    num_experts = weight.shape[0]
    grid = lambda bm, bn: (triton.cdiv(order.numel(), bm) + num_experts, triton.cdiv(n_out, bn))  # noqa: E731
    args = (a, weight, out, order, offsets, scale if scale is not None else a, a, a)
    args += (num_experts, n_out, k_dim, top_k, _rows_hint(order), a.stride(0), a.stride(1))
    args += (weight.stride(0), weight.stride(w_n), weight.stride(w_k), out.stride(0), out.stride(1), 0, 0)
    _launch(
        _grouped_gemm_kernel, grid, args, tiles,
        GATHER_A=gather_a, EPILOGUE=_PLAIN, HAS_SCALE=scale is not None, STORE_PREACT=False,
        UPCAST=interpreting(), INPUT_PRECISION=_input_precision(a.dtype), E_PAD=_next_pow2(num_experts),
    )  # fmt: skip
    return out


def gate_up_swiglu(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    *,
    store_preact: bool,
    tiles: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h = silu(x[t] @ gate^T) * (x[t] @ up^T) for every sorted assignment; x rows are gathered in-kernel.

    Returns h [n, I] (sorted, x's dtype) and, when store_preact, the pre-activations [n, 2I] (gate, up)
    that the backward pass needs.
    """
    n, num_experts, inter = order.numel(), gate_up.shape[0], gate_up.shape[1] // 2
    h = torch.empty(n, inter, dtype=x.dtype, device=x.device)
    preact = torch.empty(n, 2 * inter, dtype=x.dtype, device=x.device) if store_preact else h
    grid = lambda bm, bn: (triton.cdiv(n, bm) + num_experts, triton.cdiv(inter, bn))  # noqa: E731
    args = (
        x,
        gate_up,
        h,
        order,
        offsets,
        x,
        preact,
        x,
        num_experts,
        inter,
        gate_up.shape[2],
        top_k,
        _rows_hint(order),
    )
    args += (x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2))
    args += (h.stride(0), h.stride(1), preact.stride(0), preact.stride(1))
    _launch(
        _grouped_gemm_kernel, grid, args, tiles,
        GATHER_A=True, EPILOGUE=_SWIGLU, HAS_SCALE=False, STORE_PREACT=store_preact,
        UPCAST=interpreting(), INPUT_PRECISION=_input_precision(x.dtype), E_PAD=_next_pow2(num_experts),
    )  # fmt: skip
    return h, (preact if store_preact else None)


def down_combine(
    h: torch.Tensor,
    down: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    num_tokens: int,
    top_k: int,
    *,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * (h[r(t, j)] @ down[e]^T), in fp32 [T, H].

    The kernel scales each row by its routing weight and scatters it to its assignment slot of a
    [T * k, H] buffer; the k slots of a token are then summed in a fixed order, so the combine is
    deterministic (no atomics). Dropped assignments (expert id outside [0, E)) contribute zero.
    """
    slots = torch.zeros(num_tokens * top_k, down.shape[1], dtype=torch.float32, device=h.device)
    grouped_gemm(
        h, down, order, offsets, top_k, gather_a=False, out=slots, scale=weights.reshape(-1), tiles=tiles
    )
    return slots.view(num_tokens, top_k, down.shape[1]).sum(1)


def down_backward(
    grad_out: torch.Tensor,
    down: torch.Tensor,
    preact: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    top_k: int,
    *,
    tiles: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients through the down projection and SwiGLU, for every sorted assignment.

    Returns d(preact) [n, 2I] (sorted, preact's dtype) and the routing-weight gradient per assignment
    [T * k] (fp32, assignment order) = <expert output row, grad_out row>, computed as <h, grad_out @ down[e]>.
    """
    n, num_experts, inter = order.numel(), down.shape[0], down.shape[2]
    d_preact = torch.empty(n, 2 * inter, dtype=preact.dtype, device=preact.device)
    # The partial sums have one column per column block, so this launch uses fixed tiles, never autotuning.
    tiles = tiles or (INTERPRETER_TILES if interpreting() else DOWN_BACKWARD_GPU_TILES)
    partial = torch.zeros(n, triton.cdiv(inter, tiles.block_n), dtype=torch.float32, device=grad_out.device)
    grid = lambda bm, bn: (triton.cdiv(n, bm) + num_experts, triton.cdiv(inter, bn))  # noqa: E731
    args = (grad_out, down, d_preact, order, offsets, weights.reshape(-1), preact, partial)
    args += (
        num_experts,
        inter,
        down.shape[1],
        top_k,
        _rows_hint(order),
        grad_out.stride(0),
        grad_out.stride(1),
    )
    args += (down.stride(0), down.stride(2), down.stride(1), d_preact.stride(0), d_preact.stride(1))
    args += (preact.stride(0), preact.stride(1))
    _launch(
        _grouped_gemm_kernel, grid, args, tiles,
        GATHER_A=True, EPILOGUE=_SWIGLU_BACKWARD, HAS_SCALE=True, STORE_PREACT=False,
        UPCAST=interpreting(), INPUT_PRECISION=_input_precision(grad_out.dtype), E_PAD=_next_pow2(num_experts),
    )  # fmt: skip
    # Rows past offsets[-1] (dropped assignments) have order 0 and partial 0: adding exact zeros keeps this
    # deterministic, and no host sync is needed to find the valid rows.
    grad_weights = torch.zeros(weights.numel(), dtype=torch.float32, device=grad_out.device)
    return d_preact, grad_weights.index_add_(0, order.long(), partial.sum(1))


def grouped_weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    *,
    gather_a: bool,
    gather_b: bool,
    out: torch.Tensor,
    scale: torch.Tensor | None = None,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """out[e] = sum over expert e's sorted rows r of (scale * a[row_a(r)])^T b[row_b(r)]  ->  [E, Ma, Nb].

    A gathered operand is in token order (row order[r] // k); otherwise it is sorted. `scale` is per assignment.
    """
    num_experts, m_dim, n_dim = out.shape
    grid = lambda bm, bn: (num_experts, triton.cdiv(m_dim, bm) * triton.cdiv(n_dim, bn))  # noqa: E731
    args = (
        a,
        b,
        out,
        order,
        offsets,
        scale if scale is not None else a,
        m_dim,
        n_dim,
        top_k,
        _rows_hint(order),
    )
    args += (a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2))
    _launch(
        _grouped_weight_grad_kernel, grid, args, tiles,
        GATHER_A=gather_a, GATHER_B=gather_b, HAS_SCALE=scale is not None,
        UPCAST=interpreting(), INPUT_PRECISION=_input_precision(a.dtype),
    )  # fmt: skip
    return out
