"""`triton_moe_experts`: the SwiGLU experts of an MoE layer as one autograd Function over the Triton kernels.

The Function holds the whole forward/backward contract; the kernels in `ops` know nothing about autograd.
"""

from __future__ import annotations

import torch
from moekit.kernels import ops

from moekit.errors import UserError


class _TritonMoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, tiles, keep_for_backward):
        num_tokens, top_k = top_k_index.shape
        ids = top_k_index.reshape(-1).to(torch.int32)
        weights = top_k_weights.reshape(-1).contiguous()
        _, offsets = ops.expert_offsets(ids, gate_up_proj.shape[0])
        order = ops.sort_by_expert(ids, offsets)
        h, preact = ops.gate_up_swiglu(
            hidden, gate_up_proj, order, offsets, top_k, store_preact=keep_for_backward, tiles=tiles
        )
        out = ops.down_combine(h, down_proj, order, offsets, weights, num_tokens, top_k, tiles=tiles)
        if keep_for_backward:
            ctx.save_for_backward(hidden, top_k_weights, gate_up_proj, down_proj, order, offsets, h, preact)
            ctx.tiles = tiles
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, top_k_weights, gate_up_proj, down_proj, order, offsets, h, preact = ctx.saved_tensors
        need_hidden, _, need_weights, need_gate_up, need_down, _, _ = ctx.needs_input_grad
        num_tokens, top_k = top_k_weights.shape
        weights = top_k_weights.reshape(-1).contiguous()
        grad_out = grad_out.to(hidden.dtype)
        grad_hidden = grad_weights = grad_gate_up = grad_down = None
        if need_down:
            grad_down = ops.grouped_weight_grad(
                grad_out, h, order, offsets, top_k, gather_a=True, gather_b=False,
                out=torch.empty_like(down_proj), scale=weights, tiles=ctx.tiles,
            )  # fmt: skip
        if need_hidden or need_weights or need_gate_up:
            d_preact, grad_w = ops.down_backward(
                grad_out, down_proj, preact, order, offsets, weights, top_k, tiles=ctx.tiles
            )
            grad_weights = grad_w.view(num_tokens, top_k).to(top_k_weights.dtype)
        if need_gate_up:
            grad_gate_up = ops.grouped_weight_grad(
                d_preact, hidden, order, offsets, top_k, gather_a=False, gather_b=True,
                out=torch.empty_like(gate_up_proj), tiles=ctx.tiles,
            )  # fmt: skip
        if need_hidden:
            slots = torch.empty(num_tokens * top_k, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
            ops.grouped_gemm(
                d_preact, gate_up_proj, order, offsets, top_k, gather_a=False, out=slots,
                transpose_weight=True, tiles=ctx.tiles,
            )  # fmt: skip
            grad_hidden = ops.combine_slots(slots, order, offsets, num_tokens, top_k)
        return grad_hidden, None, grad_weights, grad_gate_up, grad_down, None, None


def _check(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj) -> None:
    if hidden.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape != top_k_weights.shape:
        raise UserError(
            f"triton_moe_experts: hidden must be [T, H] and top_k_index/top_k_weights [T, k]; got "
            f"{tuple(hidden.shape)}, {tuple(top_k_index.shape)}, {tuple(top_k_weights.shape)}"
        )
    num_experts, two_inter, size = gate_up_proj.shape
    if (
        hidden.shape[1] != size
        or top_k_index.shape[0] != hidden.shape[0]
        or tuple(down_proj.shape) != (num_experts, size, two_inter // 2)
        or two_inter % 2
    ):
        raise UserError(
            f"triton_moe_experts: shapes do not fit hidden [T, H], gate_up_proj [E, 2I, H], down_proj [E, H, I]: "
            f"{tuple(hidden.shape)}, {tuple(gate_up_proj.shape)}, {tuple(down_proj.shape)}"
        )
    if not hidden.dtype == gate_up_proj.dtype == down_proj.dtype:
        raise UserError(
            f"triton_moe_experts: hidden, gate_up_proj and down_proj must share a dtype; got {hidden.dtype}, "
            f"{gate_up_proj.dtype}, {down_proj.dtype}: cast them first"
        )
    if top_k_index.is_floating_point():
        raise UserError(f"triton_moe_experts: top_k_index must be an integer tensor, got {top_k_index.dtype}")
    if not ops.interpreting() and hidden.device.type != "cuda":
        raise UserError(
            "triton_moe_experts: tensors must be on a CUDA device (or set TRITON_INTERPRET=1 for CPU)"
        )


def triton_moe_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    tiles: ops.TileConfig | None = None,
) -> torch.Tensor:
    """sum_j top_k_weights[t, j] * down[e] @ (silu(gate[e] @ x) * (up[e] @ x)), e = top_k_index[t, j]  ->  [T, H].

    gate_up_proj is [E, 2I, H] (gate rows, then up rows) and down_proj [E, H, I], as in transformers 5.
    Differentiable w.r.t. hidden, top_k_weights, gate_up_proj and down_proj. Accumulates in fp32 and returns
    hidden's dtype. Expert ids outside [0, E) are dropped (they contribute zero), which is how callers
    express capacity-dropped assignments. `tiles` fixes the tile sizes; by default they are autotuned on a
    GPU and small under the interpreter.
    """
    _check(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj)
    # Decided here, not from ctx.needs_input_grad, which stays True under torch.no_grad() for parameters
    # that require grad (the usual inference case): inference must not keep the [T*k, 2I] pre-activations.
    differentiable = (hidden, top_k_weights, gate_up_proj, down_proj)
    keep_for_backward = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    return _TritonMoEExperts.apply(
        hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, tiles, keep_for_backward
    )
