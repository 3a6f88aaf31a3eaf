"""Plain-torch twins of the kernels in `moekit.kernels.ops`: same arguments, same results, no Triton.

They spell out each kernel's contract with ordinary tensor ops (bincount, a stable sort, one matmul per
expert) and compute in fp32. The tests compare every kernel with its twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_offsets_reference(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of `ops.expert_offsets`: counts [E] and offsets [E + 1]; ids outside [0, E) are dropped."""
    ids = ids.reshape(-1).long()
    counts = torch.bincount(ids[(ids >= 0) & (ids < num_experts)], minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return counts.int(), offsets.int()


def sort_by_expert_reference(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Twin of `ops.sort_by_expert`: a stable sort of the flat ids, dropped ids last."""
    ids = ids.reshape(-1).long()
    keys = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    return torch.sort(keys, stable=True).indices.int()


def _expert_rows(offsets: torch.Tensor):
    """(expert, slice of sorted rows) for every expert, empty ones included."""
    bounds = offsets.tolist()
    return [(e, slice(bounds[e], bounds[e + 1])) for e in range(len(bounds) - 1)]


def _rows_of(order: torch.Tensor, rows: slice, top_k: int, gather: bool) -> torch.Tensor:
    """Token rows (gathered operand) or sorted rows for `rows`."""
    return order[rows].long() // top_k if gather else torch.arange(rows.start, rows.stop, device=order.device)


def grouped_gemm_reference(
    a, weight, order, offsets, top_k, *, gather_a, out, transpose_weight=False, scale=None, tiles=None
) -> torch.Tensor:
    """Twin of `ops.grouped_gemm`."""
    del tiles  # tile sizes do not change the result
    for e, rows in _expert_rows(offsets):
        w = weight[e].float().T if transpose_weight else weight[e].float()
        y = a[_rows_of(order, rows, top_k, gather_a)].float() @ w.T
        if scale is not None:
            y = y * scale.reshape(-1)[order[rows].long()].float()[:, None]
        out_rows = _rows_of(order, rows, top_k, False) if gather_a else order[rows].long()
        out[out_rows] = y.to(out.dtype)
    return out


def gate_up_swiglu_reference(x, gate_up, order, offsets, top_k, *, store_preact, tiles=None):
    """Twin of `ops.gate_up_swiglu`."""
    del tiles
    inter = gate_up.shape[1] // 2
    preact = torch.zeros(order.numel(), 2 * inter, device=x.device)
    for e, rows in _expert_rows(offsets):
        preact[rows] = x[order[rows].long() // top_k].float() @ gate_up[e].float().T
    h = F.silu(preact[:, :inter]) * preact[:, inter:]
    return h.to(x.dtype), (preact.to(x.dtype) if store_preact else None)


def down_combine_reference(h, down, order, offsets, weights, num_tokens, top_k, *, tiles=None):
    """Twin of `ops.down_combine`: per-assignment rows, scaled, summed per token in fp32."""
    del tiles
    slots = torch.zeros(num_tokens * top_k, down.shape[1], device=h.device)
    grouped_gemm_reference(h, down, order, offsets, top_k, gather_a=False, out=slots, scale=weights)
    return slots.view(num_tokens, top_k, down.shape[1]).sum(1)


def down_backward_reference(grad_out, down, preact, order, offsets, weights, top_k, *, tiles=None):
    """Twin of `ops.down_backward`: d(preact) [n, 2I] and the routing-weight gradient [T * k] (fp32)."""
    del tiles
    inter = down.shape[2]
    d_h = torch.zeros(order.numel(), inter, device=grad_out.device)
    grouped_gemm_reference(
        grad_out, down, order, offsets, top_k, gather_a=True, out=d_h, transpose_weight=True
    )
    gate, up = preact[:, :inter].float(), preact[:, inter:].float()
    valid = int(offsets[-1])
    slots = order[:valid].long()
    grad_weights = torch.zeros(weights.numel(), device=grad_out.device)
    grad_weights[slots] = (F.silu(gate) * up * d_h)[:valid].sum(1)
    row_weights = torch.zeros(order.numel(), device=grad_out.device)
    row_weights[:valid] = weights.reshape(-1)[slots].float()
    d_h = d_h * row_weights[:, None]
    sig = torch.sigmoid(gate)
    d_preact = torch.cat([d_h * up * sig * (1 + gate * (1 - sig)), d_h * F.silu(gate)], dim=1)
    return d_preact.to(preact.dtype), grad_weights


def grouped_weight_grad_reference(
    a, b, order, offsets, top_k, *, gather_a, gather_b, out, scale=None, tiles=None
) -> torch.Tensor:
    """Twin of `ops.grouped_weight_grad`."""
    del tiles
    for e, rows in _expert_rows(offsets):
        a_e = a[_rows_of(order, rows, top_k, gather_a)].float()
        if scale is not None:
            a_e = a_e * scale.reshape(-1)[order[rows].long()].float()[:, None]
        out[e] = (a_e.T @ b[_rows_of(order, rows, top_k, gather_b)].float()).to(out.dtype)
    return out
