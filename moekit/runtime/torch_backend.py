"""The `torch` experts backend: a fast CPU path for experts of any `ExpertFunction`, with biases or without.

`forward` and `backward` are plain functions; `moekit.runtime.experts` wraps them in autograd and in the
`moekit::experts` op. Data flow (one sort, no padded copies): flat expert ids -> a stable argsort -> per-expert
counts -> gather the token rows in expert order once -> per hit expert, a GEMM with its weights into its
columns of one buffer (+ its bias) -> the activation once -> per hit expert the down GEMM (+ its bias) -> scale
by the routing weights once -> gather back into token order and sum the k slots.

Choices measured on a 2-core AVX2 EPYC without bf16 units (see bench/moe_layer.py):
- Products are written weight-first, `W @ Xᵀ` ([out, in] @ [in, n]): MKL runs that shape up to 2× faster than
  `X @ Wᵀ` for the few-row products that MoE experts see, and 1.3–1.4× faster at hundreds of rows when the row
  count is a multiple of 8 (bench/expert_gemm_layout.py; the per-expert path pads to one). All
  activations therefore stay transposed ([dim, n]). From a few hundred rows per expert the shared [dim, S]
  buffers' long rows slow MKL down, so inference there gives each expert its own blocks (`_forward_per_expert`).
- bf16/fp16 weights are multiplied in fp32 on CPUs without bf16/fp16 units, since a bf16 GEMM runs 5–10× slower
  here; where the CPU has them (AMX, AVX512-BF16; `cpu_dtype.native_low_precision`) they stay native, unmeasured
  here (no such CPU). Each expert that got tokens is upcast right before use into one reused buffer (one expert's weight at a time), so the cost is one
  read of the weights that are hit. No fp32 copy outlives a call, so nothing goes stale when the weights are
  trained, loaded or edited in place.
- Inference on a bf16 model (bf16 activations and weights) with at most `_SMALL_BATCH_ROWS` rows on every
  expert is memory-bound: reading the weights once in bf16 beats upcasting them, so that case runs two
  bf16 `torch._grouped_mm` calls (rounding like transformers' own experts do). The per-expert loop measured
  1.3–2× slower there, and faster (fp32 GEMMs) from a few dozen rows per expert on.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from moekit.runtime import activations
from moekit.runtime.cpu_dtype import native_low_precision
from moekit.runtime.expert_weights import ExpertWeights
from moekit.runtime.sorting import ExpertRows, sort_by_expert

# Inference with low-precision activations and weights and at most this many rows on every expert runs
# bf16 grouped GEMMs instead of upcasting every hit expert's weights.
_SMALL_BATCH_ROWS = 16
# Up to this many (token, slot) rows, inference runs row by row without sorting (see _forward_decode).
_DECODE_ROWS = 4
# From this many rows per expert (on average over the experts hit) inference gives each expert its own buffers
# (see _forward_per_expert); below it one shared buffer per projection, with SwiGLU run once, is faster.
_PER_EXPERT_ROWS = 256
# MKL's W·Xᵀ is fast when the activations' column count is a multiple of this (bench/expert_gemm_layout.py:
# 93-100 µs a row at n = 240, 248, 256, 264; 118-149 at n = 250, 252, 260; X·Wᵀ 122-135 at any n).
_COLUMN_MULTIPLE = 8


def compute_dtype(hidden_dtype: torch.dtype, weight_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype products run in: the wider of the two; on a CPU, bf16/fp16 stay native only where it has units
    for them (AMX / AVX512-BF16 / AVX512-FP16, see `cpu_dtype`), and become fp32 elsewhere. Forward and backward
    use the same choice."""
    dtype = torch.promote_types(hidden_dtype, weight_dtype)
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not native_low_precision(dtype):
        return torch.float32
    return dtype


class Upcaster:
    """One reused buffer that holds one expert's weight in the compute dtype at a time.

    Reusing it keeps the pages mapped and warm: a fresh fp32 copy per expert costs page faults, and upcasting
    in many small blocks costs one parallel region per block, which stalls badly on a busy machine.
    """

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.numel, self.dtype, self.device = numel, dtype, device
        self.buffer: torch.Tensor | None = None  # allocated on first use: same-dtype weights never need it

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dtype == self.dtype:
            return weight
        if self.buffer is None:
            self.buffer = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        upcast = self.buffer[: weight.numel()].view(weight.shape)
        upcast.copy_(weight)
        return upcast


def _combine(sorted_rows: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
    """Sum the expert-sorted rows [T*k, H] back into token order -> [T, H]; rows past bounds[E] must be zero.

    One row gather per slot, added up: index_add_ (a parallel scatter-add) stalled for up to ~0.5 s per
    layer on this busy 2-core machine, and one gather of all T*k rows costs a large fresh buffer."""
    out = sorted_rows.index_select(0, rows.inverse[:, 0])
    for slot in range(1, rows.inverse.shape[1]):
        out.add_(sorted_rows.index_select(0, rows.inverse[:, slot]))
    return out


def _add_bias(block: torch.Tensor, bias: torch.Tensor | None, expert: int) -> None:
    """block [dim, n] += bias[expert] [dim] (transposed activations)."""
    if bias is not None:
        block.add_(bias[expert].to(block.dtype)[:, None])


def _gate_up(hidden_t, rows: ExpertRows, w: ExpertWeights, dtype, upcast: Upcaster) -> torch.Tensor:
    """The transposed pre-activation [P, S] of every kept row, bias included."""
    preact_t = torch.empty(w.gate_up_proj.shape[1], rows.num_kept, dtype=dtype, device=hidden_t.device)
    for expert, (start, stop) in enumerate(zip(rows.bounds, rows.bounds[1:])):
        if start < stop:
            block = preact_t[:, start:stop]
            torch.mm(upcast(w.gate_up_proj[expert]), hidden_t[:, start:stop], out=block)
            _add_bias(block, w.gate_up_bias, expert)
    return preact_t


def _forward(
    hidden: torch.Tensor,
    rows: ExpertRows,
    row_weights: torch.Tensor,
    w: ExpertWeights,
    dtype: torch.dtype,
    keep_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Experts output [T, H] in `dtype`, and the transposed pre-activation [P, S] when `keep_preact`.

    Each expert's GEMM writes its own columns of one [dim, S] buffer, so the activation, the routing-weight
    scale and the combine run once over all experts: every op is a parallel region, and on a busy machine
    each one can stall, so per-expert elementwise ops cost far more than their arithmetic."""
    num_rows = rows.num_kept
    hit = [(a, b, e) for e, (a, b) in enumerate(zip(rows.bounds, rows.bounds[1:])) if a < b]
    hidden_t = hidden[rows.tokens[:num_rows]].t()  # [H, S]
    upcast = Upcaster(w.gate_up_proj[0].numel(), dtype, hidden.device)
    preact_t = _gate_up(hidden_t, rows, w, dtype, upcast)
    act_t = activations.apply(preact_t, w.fn, in_place=not keep_preact)  # [I, S]
    out_t = torch.empty(w.down_proj.shape[1], num_rows, dtype=dtype, device=hidden.device)
    for start, stop, expert in hit:
        torch.mm(upcast(w.down_proj[expert]), act_t[:, start:stop], out=out_t[:, start:stop])
        _add_bias(out_t[:, start:stop], w.down_bias, expert)
    sorted_out = torch.zeros(rows.order.numel(), hidden.shape[1], dtype=dtype, device=hidden.device)
    torch.mul(out_t.t(), row_weights[:num_rows, None], out=sorted_out[:num_rows])
    return _combine(sorted_out, rows), preact_t if keep_preact else None


class Saved(NamedTuple):
    """What the forward pass keeps for the backward pass."""

    rows: ExpertRows
    hidden: torch.Tensor  # [T, H] in the compute dtype
    row_weights: torch.Tensor  # [T*k] routing weights in sorted order, compute dtype
    preact_t: torch.Tensor  # [P, S]
    dtype: torch.dtype


def forward(
    hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, w: ExpertWeights, keep: bool
) -> tuple[torch.Tensor, Saved | None]:
    """The experts' output [T, H] in hidden's dtype, and with `keep` what `backward` needs.

    Without `keep` (inference) the fastest path for the batch shape runs (see the module docstring)."""
    dtype = compute_dtype(hidden.dtype, w.gate_up_proj.dtype, hidden.device)
    if keep:
        rows = sort_by_expert(top_k_index, w.gate_up_proj.shape[0])
        hidden_c = hidden.to(dtype)
        row_weights = top_k_weights.reshape(-1).to(dtype)[rows.order]
        out, preact_t = _forward(hidden_c, rows, row_weights, w, dtype, keep_preact=True)
        return out.to(hidden.dtype), Saved(rows, hidden_c, row_weights, preact_t, dtype)
    if top_k_index.numel() <= _DECODE_ROWS:
        return _forward_decode(hidden, top_k_index, top_k_weights, w, dtype), None
    rows = sort_by_expert(top_k_index, w.gate_up_proj.shape[0])
    row_weights = top_k_weights.reshape(-1).to(dtype)[rows.order]
    if _small_low_precision_batch(hidden, w.gate_up_proj, w.down_proj, rows):
        out = _forward_grouped(hidden, rows, row_weights, w)
    elif _rows_per_hit_expert(rows) >= _PER_EXPERT_ROWS:
        out = _forward_per_expert(hidden.to(dtype), rows, row_weights, w, dtype)
    else:
        out, _ = _forward(hidden.to(dtype), rows, row_weights, w, dtype, keep_preact=False)
    return out.to(hidden.dtype), None


def backward(
    grad_out: torch.Tensor, saved: Saved, top_k_weights: torch.Tensor, w: ExpertWeights, needs: list[bool]
) -> list[torch.Tensor | None]:
    """Gradients [hidden, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias] (None where
    `needs` is False or the bias is absent), from the output gradient [T, H]."""
    rows, hidden, row_weights, dtype = saved.rows, saved.hidden, saved.row_weights, saved.dtype
    need_x, need_w, need_gate_up, need_down, need_gate_up_bias, need_down_bias = needs
    gate_up_proj, down_proj = w.gate_up_proj, w.down_proj
    grad_out = grad_out.to(dtype)
    grad_x_sorted = hidden.new_zeros(rows.order.numel(), hidden.shape[1]) if need_x else None
    grad_rows = torch.zeros_like(row_weights) if need_w else None
    grad_gate_up = torch.zeros_like(gate_up_proj) if need_gate_up else None
    grad_down = torch.zeros_like(down_proj) if need_down else None
    grad_gate_up_bias = torch.zeros_like(w.gate_up_bias) if need_gate_up_bias else None
    grad_down_bias = torch.zeros_like(w.down_bias) if need_down_bias else None
    upcast = Upcaster(gate_up_proj[0].numel(), dtype, hidden.device)
    for expert in range(gate_up_proj.shape[0]):
        start, stop = rows.bounds[expert], rows.bounds[expert + 1]
        if start == stop:
            continue
        preact_t = saved.preact_t[:, start:stop]
        tokens, scale = rows.tokens[start:stop], row_weights[start:stop]
        act_t = activations.recompute(preact_t, w.fn)  # [I, n]
        grad_y_t = grad_out[tokens].t()  # [H, n]
        grad_act_unscaled = upcast(down_proj[expert]).t() @ grad_y_t  # [I, n]
        if grad_rows is not None:  # <grad_out, down · act + down_bias>
            grad_rows[start:stop] = (grad_act_unscaled * act_t).sum(dim=0)
            if w.down_bias is not None:
                grad_rows[start:stop] += w.down_bias[expert].to(dtype) @ grad_y_t
        if grad_down is not None:
            grad_down[expert] = (grad_y_t * scale) @ act_t.t()
        if grad_down_bias is not None:
            grad_down_bias[expert] = (grad_y_t * scale).sum(dim=1)
        grad_act = grad_act_unscaled * scale
        grad_preact_t = activations.backward(preact_t, grad_act, w.fn)  # [P, n]
        if grad_gate_up is not None:
            grad_gate_up[expert] = grad_preact_t @ hidden[tokens]
        if grad_gate_up_bias is not None:
            grad_gate_up_bias[expert] = grad_preact_t.sum(dim=1)
        if grad_x_sorted is not None:
            grad_x_sorted[start:stop] = (upcast(gate_up_proj[expert]).t() @ grad_preact_t).t()
    grad_weights = None
    if grad_rows is not None:
        grad_weights = torch.zeros_like(grad_rows).index_copy_(0, rows.order, grad_rows)
        grad_weights = grad_weights.reshape(top_k_weights.shape).to(top_k_weights.dtype)
    grad_x = _combine(grad_x_sorted, rows) if grad_x_sorted is not None else None
    return [grad_x, grad_weights, grad_gate_up, grad_down, grad_gate_up_bias, grad_down_bias]


def _forward_decode(hidden, top_k_index, top_k_weights, w: ExpertWeights, dtype) -> torch.Tensor:
    """A token or two (decoding): one row at a time, no sort -> [T, H] in hidden's dtype.

    Each product is a matrix-vector product, bound by reading the expert's weights, so what is left to cut is
    the number of ops per call: the sorted path's bookkeeping made a 1-token layer 10% slower than
    transformers' grouped_mm. Weights are read in their own dtype when the activations share it (bf16 reads
    half the bytes, and rounds as transformers' experts do); otherwise rows are computed in `dtype`."""
    gate_up_proj, down_proj = w.gate_up_proj, w.down_proj
    if hidden.dtype == gate_up_proj.dtype:
        dtype = hidden.dtype
    upcast = Upcaster(gate_up_proj[0].numel(), dtype, hidden.device)
    out = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
    x_all, weights = hidden.to(dtype), top_k_weights.to(dtype)
    for token, experts in enumerate(top_k_index.tolist()):
        x = x_all[token : token + 1]
        for slot, expert in enumerate(experts):
            if not 0 <= expert < gate_up_proj.shape[0]:
                continue  # a dropped assignment
            preact = F.linear(x, upcast(gate_up_proj[expert]), _bias_row(w.gate_up_bias, expert, dtype))
            act = activations.apply(preact, w.fn, in_place=True, dim=1)
            y = F.linear(act, upcast(down_proj[expert]), _bias_row(w.down_bias, expert, dtype))
            out[token : token + 1].add_(y.mul_(weights[token, slot]))
    return out.to(hidden.dtype)


def _bias_row(bias: torch.Tensor | None, expert: int, dtype: torch.dtype) -> torch.Tensor | None:
    return None if bias is None else bias[expert].to(dtype)


def _rows_per_hit_expert(rows: ExpertRows) -> float:
    hit = sum(a < b for a, b in zip(rows.bounds, rows.bounds[1:]))
    return rows.bounds[-1] / max(1, hit)


def _forward_per_expert(hidden, rows: ExpertRows, row_weights, w: ExpertWeights, dtype) -> torch.Tensor:
    """Inference with many rows per expert -> [T, H] in `dtype`: per expert, W·Xᵀ into its own [P, n] block,
    the activation there, the down product W·actᵀ into an [H, n] block, and that block, scaled, into the
    expert's rows.

    Weight-first, like `_forward`, but every block is the expert's own and contiguous: the shared [2I, S] buffer
    has a leading dimension of S, which slows MKL down at a few hundred rows per expert. MKL runs W·Xᵀ 1.3-1.4×
    faster than X·Wᵀ here when n is a multiple of 8 and 0.9-1.1× when it is not, so each expert's rows are
    padded to a multiple of 8 (repeating its last row; the extra columns are dropped)."""
    num_rows = rows.num_kept
    upcast = Upcaster(w.gate_up_proj[0].numel(), dtype, hidden.device)
    sorted_out = torch.empty(rows.order.numel(), hidden.shape[1], dtype=dtype, device=hidden.device)
    sorted_out[num_rows:] = 0
    for expert, (start, stop) in enumerate(zip(rows.bounds, rows.bounds[1:])):
        if start == stop:
            continue
        tokens = rows.tokens[start:stop]
        pad = -(stop - start) % _COLUMN_MULTIPLE
        if pad:
            tokens = torch.cat([tokens, tokens[-1:].expand(pad)])
        x_t = hidden.index_select(0, tokens).t()  # [H, n + pad]
        preact_t = torch.mm(upcast(w.gate_up_proj[expert]), x_t)
        _add_bias(preact_t, w.gate_up_bias, expert)
        act_t = activations.apply(preact_t, w.fn, in_place=True)  # [I, n + pad]
        out_t = torch.mm(upcast(w.down_proj[expert]), act_t)  # [H, n + pad]
        _add_bias(out_t, w.down_bias, expert)
        torch.mul(out_t[:, : stop - start].t(), row_weights[start:stop, None], out=sorted_out[start:stop])
    return _combine(sorted_out, rows)


def _small_low_precision_batch(
    hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, rows: ExpertRows
) -> bool:
    """bf16/fp16 activations and weights on a CPU, and few rows on every expert (see the module docstring)."""
    busiest = max(b - a for a, b in zip(rows.bounds, rows.bounds[1:]))
    return (
        hidden.device.type == "cpu"
        and hidden.dtype == gate_up_proj.dtype
        and hidden.dtype in (torch.bfloat16, torch.float16)
        and 0 < busiest <= _SMALL_BATCH_ROWS
        and hasattr(torch, "_grouped_mm")
        and all(_rows_16_byte_aligned(t) for t in (gate_up_proj, down_proj))
    )


def _rows_16_byte_aligned(weight: torch.Tensor) -> bool:
    """torch._grouped_mm refuses operands whose rows are not whole multiples of 16 bytes.

    Real models' sizes are multiples of 8, but a tiny model (I = 6 in bf16) is not, and must take another path."""
    return all((n * weight.element_size()) % 16 == 0 for n in weight.shape[1:])


def _forward_grouped(hidden, rows: ExpertRows, row_weights, w: ExpertWeights) -> torch.Tensor:
    """Inference in the weights' dtype with two grouped GEMMs over the expert-sorted rows -> [T, H] fp32."""
    num_rows = rows.num_kept
    tokens = rows.tokens[:num_rows]
    ends = torch.tensor(rows.bounds[1:], dtype=torch.int32)  # grouped_mm wants int32 end offsets
    experts = None
    if w.gate_up_bias is not None or w.down_bias is not None:
        experts = torch.repeat_interleave(torch.arange(len(rows.bounds) - 1), rows.counts)
    preact = torch._grouped_mm(hidden[tokens], w.gate_up_proj.transpose(1, 2), offs=ends)  # [S, P]
    if w.gate_up_bias is not None:
        preact = preact + w.gate_up_bias[experts].to(preact.dtype)
    act = activations.apply(preact, w.fn, dim=1)
    rows_out = torch._grouped_mm(act, w.down_proj.transpose(1, 2), offs=ends)
    if w.down_bias is not None:
        rows_out = rows_out + w.down_bias[experts].to(rows_out.dtype)
    sorted_out = torch.zeros(rows.order.numel(), hidden.shape[1])
    torch.mul(rows_out, row_weights[:num_rows, None], out=sorted_out[:num_rows])
    return _combine(sorted_out, rows)
