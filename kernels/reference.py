"""Plain-torch twins of the kernels in `moekit.kernels.ops`: same arguments, same results, no Triton.

They spell out each kernel's contract with ordinary tensor ops (bincount, a stable sort, one matmul per
expert) and compute in fp32. The tests compare every kernel with its twin.
"""

from __future__ import annotations

import torch

from moekit.runtime import activations
from moekit.runtime.activations import ExpertFunction


def _fn(epilogue) -> ExpertFunction:
    """The ExpertFunction of an `ops.Epilogue` (None: SiLU-gated)."""
    if epilogue is None:
        return activations.SWIGLU
    return ExpertFunction(
        epilogue.activation, epilogue.gated, epilogue.interleaved, epilogue.alpha, epilogue.limit
    )


def _to_concatenated(preact: torch.Tensor, fn: ExpertFunction) -> torch.Tensor:
    """[n, P] in the weight's row order -> gate columns then up columns, as the kernels store it."""
    if not fn.gated:
        return preact
    return torch.cat(activations.split_gate_up(preact, fn, dim=1), dim=1)


def _from_concatenated(preact: torch.Tensor, fn: ExpertFunction) -> torch.Tensor:
    if not fn.gated:
        return preact
    gate, up = preact.chunk(2, dim=1)
    return activations.join_gate_up(gate, up, fn, dim=1)


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
    a,
    weight,
    order,
    offsets,
    top_k,
    *,
    gather_a,
    out,
    transpose_weight=False,
    scale=None,
    bias=None,
    tiles=None,
) -> torch.Tensor:
    """Twin of `ops.grouped_gemm`."""
    del tiles  # tile sizes do not change the result
    for e, rows in _expert_rows(offsets):
        w = weight[e].float().T if transpose_weight else weight[e].float()
        y = a[_rows_of(order, rows, top_k, gather_a)].float() @ w.T
        if bias is not None:
            y = y + bias[e].float()
        if scale is not None:
            y = y * scale.reshape(-1)[order[rows].long()].float()[:, None]
        out_rows = _rows_of(order, rows, top_k, False) if gather_a else order[rows].long()
        out[out_rows] = y.to(out.dtype)
    return out


def gate_up_swiglu_reference(
    x, gate_up, order, offsets, top_k, *, store_preact, bias=None, epilogue=None, tiles=None
):
    """Twin of `ops.gate_up_swiglu`: h = f(x @ gate_up[e]^T + bias[e]) with the epilogue's expert function f;
    the pre-activation comes back gate columns then up columns, whatever the weight's layout."""
    del tiles
    fn = _fn(epilogue)
    preact = torch.zeros(order.numel(), gate_up.shape[1], device=x.device)
    for e, rows in _expert_rows(offsets):
        preact[rows] = x[order[rows].long() // top_k].float() @ gate_up[e].float().T
        if bias is not None:
            preact[rows] += bias[e].float()
    h = activations.apply(preact, fn, dim=1)
    return h.to(x.dtype), (_to_concatenated(preact, fn).to(x.dtype) if store_preact else None)


def down_combine_reference(h, down, order, offsets, weights, num_tokens, top_k, *, bias=None, tiles=None):
    """Twin of `ops.down_combine`: per-assignment rows (+ the expert's bias), scaled, summed per token in fp32."""
    del tiles
    slots = torch.zeros(num_tokens * top_k, down.shape[1], device=h.device)
    grouped_gemm_reference(
        h, down, order, offsets, top_k, gather_a=False, out=slots, scale=weights, bias=bias
    )
    return slots.view(num_tokens, top_k, down.shape[1]).sum(1)


def down_backward_reference(
    grad_out, down, preact, order, offsets, weights, top_k, *, epilogue=None, tiles=None
):
    """Twin of `ops.down_backward`: d(preact) [n, P] (concatenated, as `preact`) and the routing-weight
    gradient [T * k] (fp32) without the down bias's share."""
    del tiles
    fn = _fn(epilogue)
    inter = down.shape[2]
    d_h = torch.zeros(order.numel(), inter, device=grad_out.device)
    grouped_gemm_reference(
        grad_out, down, order, offsets, top_k, gather_a=True, out=d_h, transpose_weight=True
    )
    preact_layout = _from_concatenated(preact.float(), fn)
    valid = int(offsets[-1])
    slots = order[:valid].long()
    grad_weights = torch.zeros(weights.numel(), device=grad_out.device)
    grad_weights[slots] = (activations.apply(preact_layout, fn, dim=1) * d_h)[:valid].sum(1)
    row_weights = torch.zeros(order.numel(), device=grad_out.device)
    row_weights[:valid] = weights.reshape(-1)[slots].float()
    d_preact = activations.backward(preact_layout, d_h * row_weights[:, None], fn, dim=1)
    return _to_concatenated(d_preact, fn).to(preact.dtype), grad_weights


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
