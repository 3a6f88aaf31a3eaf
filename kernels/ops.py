"""The Triton kernels of the MoE experts and their launchers.

Imported lazily (through `moekit.kernels`) because `triton.jit` decides at definition time whether a kernel
runs on the GPU or on the CPU interpreter: TRITON_INTERPRET must be set before this module is imported.

Naming: an *assignment* is one (token, slot) pair of `top_k_index`, numbered `slot = token * k + j`.
`order` lists the assignments sorted by expert (indices only); `offsets[e]:offsets[e + 1]` is expert e's
range in it. Row r of a "sorted" tensor belongs to assignment `order[r]`. Every kernel has a plain-torch
twin in `moekit.kernels.reference`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moekit.errors import UserError


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
# Row tiles that sweep the column blocks together (L2-friendly program order, as vLLM's fused_moe does).
GROUP_M = 8


def _gpu_autotune_configs(dtype: torch.dtype = torch.bfloat16) -> list[triton.Config]:
    """Candidates for H100-class GPUs (see kernels/README.md for the SMEM/register reasoning).

    Four per dtype, so that a first call tunes in seconds: decode (few rows per expert, weight-bandwidth
    bound), mid-size, and the two prefill shapes. fp32 operands take twice the SMEM and registers per
    element: 128x128x64 fp32 tiles spill and the fused gate/up kernel's 3 stages would need 288 KiB, so fp32
    gets tiles with half the bytes."""
    if dtype == torch.float32:
        shapes = [(16, 64, 64, 4, 3), (64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 8, 3)]
    else:
        shapes = [(16, 128, 128, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3)]
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


def _device_guard(tensors) -> contextlib.AbstractContextManager:
    """Run a launch on its inputs' GPU: Triton launches on the *current* CUDA device, which with a model spread
    over several GPUs is not the device of a layer on cuda:1. All inputs must share one device."""
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        names = ", ".join(sorted(map(str, devices)))
        raise UserError(f"moekit.kernels: inputs are on different devices ({names}); move them to one device")
    device = next(iter(devices), None)
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _run(kernel, grid: tuple[int, ...], args: tuple, **constexprs) -> None:
    """Launch `kernel` with fixed constexprs on its inputs' device."""
    with _device_guard(args):
        kernel[grid](*args, **constexprs)


def _routing_tiles(num_experts: int) -> tuple[int, int]:
    # Bins: the experts, then one bin for dropped ids (outside [0, E)) and the padding past n, so no masked
    # histogram is needed (tl.histogram has no mask before Triton 3.3). The scatter ranks a block of ids with
    # a [BLOCK, BINS] one-hot prefix sum, kept to 8192 elements (64 registers a thread at 4 warps).
    bins = _next_pow2(num_experts + 1)
    return max(16, min(1024, 8192 // bins)), bins


@triton.jit
def _block_histogram_kernel(ids_ptr, counts_ptr, n, num_experts, BLOCK: tl.constexpr, BINS: tl.constexpr):
    # One program per block of ids (parallel over the ids); the per-block counts are summed, and prefix-summed
    # over blocks, by the caller. Deterministic: no atomics across programs.
    block = tl.program_id(0)
    idx = block * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + idx, mask=idx < n, other=-1)
    bins = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    tl.store(counts_ptr + block * BINS + tl.arange(0, BINS), tl.histogram(bins, BINS))


def _block_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per block of ids, how many fall in each bin (experts, then the dropped bin): int32 [blocks, BINS]."""
    block, bins = _routing_tiles(num_experts)
    blocks = max(1, triton.cdiv(ids.numel(), block))
    counts = torch.empty(blocks, bins, dtype=torch.int32, device=ids.device)
    _run(_block_histogram_kernel, (blocks,), (ids, counts, ids.numel(), num_experts), BLOCK=block, BINS=bins)
    return counts


def expert_offsets(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert counts [E] and offsets [E + 1] (int32) of the flat expert ids; ids outside [0, E) are dropped."""
    ids = ids.reshape(-1).contiguous()
    counts = _block_counts(ids, num_experts).sum(0, dtype=torch.int32)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    torch.cumsum(counts, 0, dtype=torch.int32, out=offsets[1:])
    return counts, offsets


@triton.jit
def _scatter_by_expert_kernel(
    ids_ptr, bases_ptr, order_ptr, n, num_experts, BLOCK: tl.constexpr, BINS: tl.constexpr
):
    # A counting sort, parallel over blocks of ids: bases[block, bin] is where this block's first id of that
    # bin goes (all earlier blocks' ids of the bin come before it), and an id's rank among its block's ids of
    # the same bin comes from a prefix sum of the one-hot matrix, so the order is stable without atomics.
    block = tl.program_id(0)
    idx = block * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + idx, mask=idx < n, other=-1)
    bins = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    one_hot = (bins[:, None] == tl.arange(0, BINS)[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(one_hot, 0) * one_hot, 1) - 1
    base = tl.load(bases_ptr + block * BINS + bins)
    tl.store(order_ptr + base + rank, idx, mask=idx < n)


def sort_by_expert(ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Assignment indices (int32 [n]) sorted stably by expert; the dropped assignments follow, in order, from
    offsets[-1] on, so `order` is a permutation of the assignments."""
    ids = ids.reshape(-1).contiguous()
    num_experts = offsets.numel() - 1
    counts = _block_counts(ids, num_experts)
    totals = counts.sum(0, dtype=torch.int32)
    bin_start = torch.cumsum(totals, 0, dtype=torch.int32) - totals
    bases = bin_start + torch.cumsum(counts, 0, dtype=torch.int32) - counts
    order = torch.empty(ids.numel(), dtype=torch.int32, device=ids.device)
    block, bins = _routing_tiles(num_experts)
    _run(
        _scatter_by_expert_kernel, (counts.shape[0],), (ids, bases, order, ids.numel(), num_experts),
        BLOCK=block, BINS=bins,
    )  # fmt: skip
    return order


# --------------------------------------------------------------------------------------------------------
# The grouped GEMM: one program per (expert, block of sorted rows) tile and block of output columns
# --------------------------------------------------------------------------------------------------------

_PLAIN, _ACTIVATION, _ACTIVATION_BACKWARD = 0, 1, 2

# Activations the epilogues compute (moekit.runtime.activations names -> the ACTIVATION constexpr).
ACTIVATIONS = {
    "silu": 0,
    "gelu": 1,
    "gelu_pytorch_tanh": 2,
    "quick_gelu": 3,
    "relu": 4,
    "relu2": 5,
    "sigmoid": 6,
    "tanh": 7,
    "linear": 8,
    "swigluoai": 9,
}
_SQRT_2_OVER_PI = 0.7978845608028654


@dataclass(frozen=True)
class Epilogue:
    """The expert function of the gate/up epilogue (see moekit.runtime.activations.ExpertFunction)."""

    activation: str = "silu"
    gated: bool = True
    interleaved: bool = False
    alpha: float = 1.702
    limit: float = 7.0


SWIGLU = Epilogue()


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _act(x, ACTIVATION: tl.constexpr):
    # act(x) in fp32 for the activations of ACTIVATIONS (swigluoai is handled by the gated epilogue).
    if ACTIVATION == 0:
        y = x * _sigmoid(x)
    elif ACTIVATION == 1:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 2:
        y = 0.5 * x * (1.0 + _tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    elif ACTIVATION == 3:
        y = x * _sigmoid(1.702 * x)
    elif ACTIVATION == 4:
        y = tl.maximum(x, 0.0)
    elif ACTIVATION == 5:
        y = tl.maximum(x, 0.0) * tl.maximum(x, 0.0)
    elif ACTIVATION == 6:
        y = _sigmoid(x)
    elif ACTIVATION == 7:
        y = _tanh(x)
    else:
        y = x
    return y


@triton.jit
def _act_grad(x, ACTIVATION: tl.constexpr):
    # d act(x) / dx in fp32.
    if ACTIVATION == 0:
        sig = _sigmoid(x)
        d = sig * (1.0 + x * (1.0 - sig))
    elif ACTIVATION == 1:
        d = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACTIVATION == 2:
        t = _tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
    elif ACTIVATION == 3:
        sig = _sigmoid(1.702 * x)
        d = sig + 1.702 * x * sig * (1.0 - sig)
    elif ACTIVATION == 4:
        d = tl.where(x > 0.0, 1.0, 0.0)
    elif ACTIVATION == 5:
        d = 2.0 * tl.maximum(x, 0.0)
    elif ACTIVATION == 6:
        sig = _sigmoid(x)
        d = sig * (1.0 - sig)
    elif ACTIVATION == 7:
        t = _tanh(x)
        d = 1.0 - t * t
    else:
        d = x * 0.0 + 1.0
    return d


@triton.jit
def _glu(gate, up, alpha, limit, ACTIVATION: tl.constexpr):
    if ACTIVATION == 9:  # gpt-oss: (clamp(up) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        y = (u + 1.0) * g * _sigmoid(alpha * g)
    elif ACTIVATION == 0:  # SiLU, written as the SwiGLU epilogue always has been
        y = gate * tl.sigmoid(gate) * up
    else:
        y = _act(gate, ACTIVATION) * up
    return y


@triton.jit
def _grouped_program_order(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # The grid is one-dimensional (CUDA caps grid y and z at 65535; x allows 2^31 - 1) and walks the
    # (row tile, column block) pairs in groups of GROUP_M row tiles that sweep the column blocks together, so a
    # group's activation rows and the weight column blocks stay in L2 while they are reused.
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_m, (pid % in_group) // group_m


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
    a_ptr, w_ptr, out_ptr, order_ptr, offsets_ptr, scale_ptr, preact_ptr, partial_ptr, bias_ptr,
    num_experts, n_out, k_dim, top_k, rows_hint, w_up_offset, bias_up_offset, alpha, limit,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on, stride_pm, stride_pn,
    stride_be, stride_bn,
    GATHER_A: tl.constexpr, EPILOGUE: tl.constexpr, HAS_SCALE: tl.constexpr, STORE_PREACT: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, E_PAD: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # out[r] = a[row(r)] @ W[e]^T for the sorted rows r of expert e, with W[e] read through (stride_wn, stride_wk)
    # so that transposed weights need no copy. GATHER_A: a is in token order, row(r) = order[r] // k, and
    # out is sorted. Otherwise a is sorted and out[order[r]] is written (the scatter to assignment order).
    # rows_hint only keys the autotuner. EPILOGUE 1 (activation): out = act(gate) * up (GATED; the up rows of W
    # lie w_up_offset elements after the gate rows, so concatenated and interleaved layouts need no copy) or
    # act(preact), each with the expert's bias (HAS_BIAS) first; the pre-activation is stored concatenated.
    num_pid_n = tl.cdiv(n_out, BLOCK_N)
    pid_m, pid_n = _grouped_program_order(
        tl.program_id(0), tl.num_programs(0) // num_pid_n, num_pid_n, GROUP_M
    )
    expert, row_start, row_end = _tile_of_program(offsets_ptr, pid_m, num_experts, BLOCK_M, E_PAD)
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
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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
        if EPILOGUE == 1 and GATED:  # the gate and up rows of gate_up_proj share the a tile
            w_up = tl.load(w_ptrs + w_up_offset, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    tile_ok = row_ok[:, None] & col_ok[None, :]
    out_ptrs = out_ptr + out_rows[:, None] * stride_om + cols[None, :] * stride_on
    if HAS_BIAS:
        bias_ptrs = bias_ptr + expert.to(tl.int64) * stride_be + cols * stride_bn
        acc += tl.load(bias_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == 1 and GATED:
            acc_up += tl.load(bias_ptrs + bias_up_offset, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 0:
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)
    elif EPILOGUE == 1:
        if GATED:
            h = _glu(acc, acc_up, alpha, limit, ACTIVATION)
        else:
            h = _act(acc, ACTIVATION)
        tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=tile_ok)
        if STORE_PREACT:  # kept for the backward pass
            pre_ptrs = preact_ptr + rows.to(tl.int64)[:, None] * stride_pm + cols[None, :] * stride_pn
            tl.store(pre_ptrs, acc.to(preact_ptr.dtype.element_ty), mask=tile_ok)
            if GATED:
                tl.store(pre_ptrs + n_out * stride_pn, acc_up.to(preact_ptr.dtype.element_ty), mask=tile_ok)
    else:
        # acc = grad_out[token] @ down[e] = d(expert output)/d(h) before the routing weight. From it: the
        # routing-weight gradient <h, acc> (one partial sum per column block, summed later without atomics
        # so it stays deterministic) and the activation's backward into d(gate), d(up) (or d(preact)).
        pre_ptrs = preact_ptr + rows.to(tl.int64)[:, None] * stride_pm + cols[None, :] * stride_pn
        gate = tl.load(pre_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        d_h = acc * tl.load(scale_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        if GATED:
            up = tl.load(pre_ptrs + n_out * stride_pn, mask=tile_ok, other=0.0).to(tl.float32)
            if ACTIVATION == 9:
                g = tl.minimum(gate, limit)
                u = tl.minimum(tl.maximum(up, -limit), limit)
                sig = _sigmoid(alpha * g)
                glu = g * sig
                h = (u + 1.0) * glu
                d_gate = (
                    d_h
                    * (u + 1.0)
                    * (sig + alpha * g * sig * (1.0 - sig))
                    * tl.where(gate <= limit, 1.0, 0.0)
                )
                d_up = d_h * glu * tl.where((up >= -limit) & (up <= limit), 1.0, 0.0)
            elif ACTIVATION == 0:  # SiLU, as the SwiGLU backward always has been
                sig = tl.sigmoid(gate)
                silu = gate * sig
                h = silu * up
                d_gate = d_h * up * sig * (1.0 + gate * (1.0 - sig))
                d_up = d_h * silu
            else:
                act = _act(gate, ACTIVATION)
                h = act * up
                d_gate = d_h * up * _act_grad(gate, ACTIVATION)
                d_up = d_h * act
            tl.store(out_ptrs + n_out * stride_on, d_up.to(out_ptr.dtype.element_ty), mask=tile_ok)
        else:
            h = _act(gate, ACTIVATION)
            d_gate = d_h * _act_grad(gate, ACTIVATION)
        tl.store(partial_ptr + rows * num_pid_n + pid_n, tl.sum(h * acc, 1), mask=row_ok)
        tl.store(out_ptrs, d_gate.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _grouped_weight_grad_kernel(
    a_ptr, b_ptr, out_ptr, order_ptr, offsets_ptr, scale_ptr,
    m_dim, n_dim, top_k, rows_hint,
    stride_am, stride_ak, stride_bm, stride_bn, stride_oe, stride_om, stride_on,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # out[e] = A_e^T @ B_e: the reduction runs over expert e's sorted rows; A and B rows are either sorted or
    # gathered from token order (row order[r] // k). Experts without rows get zeros. One-dimensional grid:
    # expert after expert, each expert's output tiles in L2-grouped order.
    tiles_m = tl.cdiv(m_dim, BLOCK_M)
    tiles_n = tl.cdiv(n_dim, BLOCK_N)
    expert = tl.program_id(0) // (tiles_m * tiles_n)
    pid_m, pid_n = _grouped_program_order(tl.program_id(0) % (tiles_m * tiles_n), tiles_m, tiles_n, GROUP_M)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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


def _launch(kernel, grid, args: tuple, tiles: TileConfig | None, dtype: torch.dtype, **constexprs) -> None:
    """Run `kernel` with explicit tiles, or autotuned on a GPU, or with the interpreter's single config, on the
    inputs' device."""
    with _device_guard(args):
        if tiles is None and not interpreting():
            # One tuner per kernel variant and operand width: the tuner's cache key holds the problem sizes,
            # not the constexpr flags, and fp32 has its own candidates.
            wide = dtype == torch.float32
            variant = (kernel, wide, tuple(sorted(constexprs.items())))
            if variant not in _AUTOTUNED:
                sizes = ["n_out", "k_dim"] if kernel is _grouped_gemm_kernel else ["m_dim", "n_dim"]
                configs = _gpu_autotune_configs(torch.float32 if wide else torch.bfloat16)
                _AUTOTUNED[variant] = triton.autotune(configs=configs, key=[*sizes, "rows_hint"])(kernel)
            _AUTOTUNED[variant][lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](
                *args, **constexprs, GROUP_M=GROUP_M
            )
            return
        t = tiles or INTERPRETER_TILES
        kernel[grid(t.block_m, t.block_n)](
            *args, **constexprs, GROUP_M=GROUP_M, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )  # fmt: skip


def _rows_hint(order: torch.Tensor, num_experts: int) -> int:
    # Part of the autotune key only, so three buckets of rows per expert: decode (<= 16), mid (<= 256) and
    # prefill; each bucket is tuned once per problem size, not once per power of two of the batch.
    per_expert = order.numel() / max(1, num_experts)
    return 0 if per_expert <= 16 else 1 if per_expert <= 256 else 2


def gemm_grid(num_rows: int, n_out: int, num_experts: int):
    """The grouped GEMM's grid for given tiles: row tiles (a static bound: every expert may end in a partial
    tile) times column blocks, all in grid x (see _grouped_program_order)."""
    return lambda bm, bn: ((triton.cdiv(num_rows, bm) + num_experts) * triton.cdiv(n_out, bn),)


def weight_grad_grid(num_experts: int, m_dim: int, n_dim: int):
    """The weight-gradient grid for given tiles: experts times output tiles, all in grid x."""
    return lambda bm, bn: (num_experts * triton.cdiv(m_dim, bm) * triton.cdiv(n_dim, bn),)


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
    bias: torch.Tensor | None = None,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """out[r] = (a[row(r)] @ W[e]^T + bias[e]) * scale per expert tile, W[e] = weight[e] (or its transpose).

    gather_a: `a` is in token order and rows are gathered inside the kernel; `out` is sorted [n, N].
    Otherwise `a` is sorted and row r is written to out[order[r]] (assignment order). `scale` (per
    assignment) multiplies each output row, after the optional per-expert `bias` [E, N]. Rows of `out` that no
    tile touches are left as they were.
    """
    w_n, w_k = (2, 1) if transpose_weight else (1, 2)
    n_out, k_dim = weight.shape[w_n], weight.shape[w_k]
    num_experts = weight.shape[0]
    grid = gemm_grid(order.numel(), n_out, num_experts)
    args = (
        a,
        weight,
        out,
        order,
        offsets,
        scale if scale is not None else a,
        a,
        a,
        a if bias is None else bias,
    )
    args += (num_experts, n_out, k_dim, top_k, _rows_hint(order, num_experts), 0, 0, 0.0, 0.0)
    args += (a.stride(0), a.stride(1))
    args += (weight.stride(0), weight.stride(w_n), weight.stride(w_k), out.stride(0), out.stride(1), 0, 0)
    args += (0, 0) if bias is None else (bias.stride(0), bias.stride(1))
    _launch(
        _grouped_gemm_kernel, grid, args, tiles, a.dtype,
        GATHER_A=gather_a, EPILOGUE=_PLAIN, HAS_SCALE=scale is not None, STORE_PREACT=False,
        UPCAST=interpreting(), INPUT_PRECISION=_input_precision(a.dtype), E_PAD=_next_pow2(num_experts),
        HAS_BIAS=bias is not None, ACTIVATION=0, GATED=False,
    )  # fmt: skip
    return out


def _gate_up_layout(weight: torch.Tensor, bias: torch.Tensor | None, epilogue: Epilogue):
    """(gate rows' stride, up rows' offset from the gate rows) for the weight, and the same for the bias."""
    width = weight.shape[1]
    if not epilogue.gated:
        return weight.stride(1), 0, (0, 0) if bias is None else (bias.stride(1), 0)
    if epilogue.interleaved:  # gate0, up0, gate1, up1, ...
        w = (2 * weight.stride(1), weight.stride(1))
        return *w, (0, 0) if bias is None else (2 * bias.stride(1), bias.stride(1))
    w = (weight.stride(1), (width // 2) * weight.stride(1))
    return *w, (0, 0) if bias is None else (bias.stride(1), (width // 2) * bias.stride(1))


def gate_up_swiglu(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    *,
    store_preact: bool,
    bias: torch.Tensor | None = None,
    epilogue: Epilogue = SWIGLU,
    tiles: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h = act(x[t] @ gate^T + b) * (x[t] @ up^T + b) (or act(x[t] @ up^T + b) without a gate) for every
    sorted assignment, with the activation of `epilogue` (SiLU-gated by default); x rows are gathered in-kernel.

    Returns h [n, I] (sorted, x's dtype) and, when store_preact, the pre-activations [n, 2I] (gate, then up,
    whatever the weight's layout; [n, I] without a gate) that the backward pass needs.
    """
    n, num_experts = order.numel(), gate_up.shape[0]
    inter = gate_up.shape[1] // 2 if epilogue.gated else gate_up.shape[1]
    h = torch.empty(n, inter, dtype=x.dtype, device=x.device)
    preact = torch.empty(n, gate_up.shape[1], dtype=x.dtype, device=x.device) if store_preact else h
    stride_wn, w_up_offset, (stride_bn, bias_up_offset) = _gate_up_layout(gate_up, bias, epilogue)
    grid = gemm_grid(n, inter, num_experts)
    args = (x, gate_up, h, order, offsets, x, preact, x, x if bias is None else bias)
    args += (num_experts, inter, gate_up.shape[2], top_k, _rows_hint(order, num_experts))
    args += (w_up_offset, bias_up_offset, epilogue.alpha, epilogue.limit)
    args += (x.stride(0), x.stride(1), gate_up.stride(0), stride_wn, gate_up.stride(2))
    args += (h.stride(0), h.stride(1), preact.stride(0), preact.stride(1))
    args += (0 if bias is None else bias.stride(0), stride_bn)
    _launch(
        _grouped_gemm_kernel, grid, args, tiles, x.dtype,
        GATHER_A=True, EPILOGUE=_ACTIVATION, HAS_SCALE=False, STORE_PREACT=store_preact,
        UPCAST=interpreting(), INPUT_PRECISION=_input_precision(x.dtype), E_PAD=_next_pow2(num_experts),
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS[epilogue.activation], GATED=epilogue.gated,
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
    bias: torch.Tensor | None = None,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * (h[r(t, j)] @ down[e]^T + bias[e]) -> [T, H] in h's dtype.

    The kernel scales each row by its routing weight and scatters it to its assignment slot of a [T * k, H]
    buffer in h's dtype (not fp32: at k=8 an fp32 buffer is 16x the bf16 input), which is not zero-filled;
    `combine_slots` then sums the k slots of a token in a fixed order, in fp32, so the combine is deterministic
    (no atomics). Dropped assignments (expert id outside [0, E)) contribute zero.
    """
    slots = torch.empty(num_tokens * top_k, down.shape[1], dtype=h.dtype, device=h.device)
    grouped_gemm(
        h,
        down,
        order,
        offsets,
        top_k,
        gather_a=False,
        out=slots,
        scale=weights.reshape(-1),
        bias=bias,
        tiles=tiles,
    )
    return combine_slots(slots, order, offsets, num_tokens, top_k)


@triton.jit
def _combine_slots_kernel(
    slots_ptr, valid_ptr, out_ptr, hidden, stride_s, stride_o, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr
):
    # Program (token, column block): the token's k slots summed in slot order, in fp32; slots of dropped
    # assignments were never written (the buffer is not zero-filled), so they are masked out, not read.
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        slot = token * TOP_K + j
        keep = col_ok & (
            tl.load(valid_ptr + slot + 0 * cols) != 0
        )  # a vector mask (the interpreter needs one)
        acc += tl.load(slots_ptr + slot * stride_s + cols, mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def combine_slots(
    slots: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, num_tokens: int, top_k: int
) -> torch.Tensor:
    """out[t] = sum_j slots[t * k + j] over the assignments that were not dropped -> [T, H] in slots' dtype.

    Which slots hold data follows from `order` (a permutation: the sorted rows before offsets[-1] are the
    kept assignments), computed on the device, so no host sync is needed."""
    n, hidden = slots.shape
    out = torch.empty(num_tokens, hidden, dtype=slots.dtype, device=slots.device)
    if num_tokens == 0:
        return out
    rows = torch.arange(n, device=slots.device)
    valid = torch.empty(n, dtype=torch.uint8, device=slots.device)
    valid.index_put_((order.long(),), (rows < offsets[-1]).to(torch.uint8))
    block_h = min(1024, _next_pow2(hidden))
    _run(
        _combine_slots_kernel, (num_tokens, triton.cdiv(hidden, block_h)),
        (slots, valid, out, hidden, slots.stride(0), out.stride(0)), TOP_K=top_k, BLOCK_H=block_h,
    )  # fmt: skip
    return out


def down_backward(
    grad_out: torch.Tensor,
    down: torch.Tensor,
    preact: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    top_k: int,
    *,
    epilogue: Epilogue = SWIGLU,
    tiles: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients through the down projection and the activation of `epilogue`, for every sorted assignment.

    Returns d(preact) [n, 2I] (sorted, preact's dtype and concatenated layout; [n, I] without a gate) and the
    routing-weight gradient per assignment [T * k] (fp32, assignment order) = <h, grad_out @ down[e]>, which
    is <expert output row, grad_out row> without the down bias.
    """
    n, num_experts, inter = order.numel(), down.shape[0], down.shape[2]
    d_preact = torch.empty(n, preact.shape[1], dtype=preact.dtype, device=preact.device)
    # The partial sums have one column per column block, so this launch uses fixed tiles, never autotuning.
    tiles = tiles or (INTERPRETER_TILES if interpreting() else DOWN_BACKWARD_GPU_TILES)
    partial = torch.zeros(n, triton.cdiv(inter, tiles.block_n), dtype=torch.float32, device=grad_out.device)
    grid = gemm_grid(n, inter, num_experts)
    args = (grad_out, down, d_preact, order, offsets, weights.reshape(-1), preact, partial, partial)
    args += (num_experts, inter, down.shape[1], top_k, _rows_hint(order, num_experts))
    args += (0, 0, epilogue.alpha, epilogue.limit, grad_out.stride(0), grad_out.stride(1))
    args += (down.stride(0), down.stride(2), down.stride(1), d_preact.stride(0), d_preact.stride(1))
    args += (preact.stride(0), preact.stride(1), 0, 0)
    _launch(
        _grouped_gemm_kernel, grid, args, tiles, grad_out.dtype,
        GATHER_A=True, EPILOGUE=_ACTIVATION_BACKWARD, HAS_SCALE=True, STORE_PREACT=False,
        UPCAST=interpreting(), INPUT_PRECISION=_input_precision(grad_out.dtype), E_PAD=_next_pow2(num_experts),
        HAS_BIAS=False, ACTIVATION=ACTIVATIONS[epilogue.activation], GATED=epilogue.gated,
    )  # fmt: skip
    # `order` is a permutation, so every slot gets exactly one row; rows past offsets[-1] (dropped
    # assignments) have partial 0. Deterministic, and no host sync is needed to find the valid rows.
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
    grid = weight_grad_grid(num_experts, m_dim, n_dim)
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
        _rows_hint(order, num_experts),
    )
    args += (a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2))
    _launch(
        _grouped_weight_grad_kernel, grid, args, tiles, a.dtype,
        GATHER_A=gather_a, GATHER_B=gather_b, HAS_SCALE=scale is not None,
        UPCAST=interpreting(), INPUT_PRECISION=_input_precision(a.dtype),
    )  # fmt: skip
    return out
