"""The experts of an MoE layer over the Triton kernels: `triton_forward` / `triton_backward`, and
`triton_moe_experts`, the same as one differentiable function.

These functions hold the whole forward/backward contract; the kernels in `ops` know nothing about autograd.
moekit's runtime calls `triton_forward` / `triton_backward` from its experts op (`backend="triton"`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from moekit.kernels import ops

from moekit.errors import UserError
from moekit.runtime.expert_weights import ExpertWeights


class Saved(NamedTuple):
    """What the forward pass keeps for the backward pass."""

    hidden: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor
    h: torch.Tensor  # [n, I] sorted activations
    preact: torch.Tensor  # [n, P] sorted pre-activations, gate then up
    tiles: ops.TileConfig | None
    hidden_dtype: torch.dtype


def _epilogue(w: ExpertWeights) -> ops.Epilogue:
    fn = w.fn
    return ops.Epilogue(fn.activation, fn.gated, fn.interleaved, fn.alpha, fn.limit)


def unsupported(w: ExpertWeights) -> str | None:
    """Why the kernels cannot run these experts (None when they can)."""
    if w.fn.activation not in ops.ACTIVATIONS:
        return (
            f"the Triton epilogues compute {', '.join(ops.ACTIVATIONS)}, not {w.fn.activation!r} "
            "(the torch backend runs it)"
        )
    return None


def triton_forward(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w: ExpertWeights,
    keep: bool,
    tiles: ops.TileConfig | None = None,
) -> tuple[torch.Tensor, Saved | None]:
    """The experts' output [T, H] (hidden's dtype), and with `keep` what `triton_backward` needs."""
    num_tokens, top_k = top_k_index.shape
    ids = top_k_index.reshape(-1).to(torch.int32)
    weights = top_k_weights.reshape(-1).contiguous()
    _, offsets = ops.expert_offsets(ids, w.gate_up_proj.shape[0])
    order = ops.sort_by_expert(ids, offsets)
    h, preact = ops.gate_up_swiglu(
        hidden, w.gate_up_proj, order, offsets, top_k, store_preact=keep, bias=w.gate_up_bias,
        epilogue=_epilogue(w), tiles=tiles,
    )  # fmt: skip
    out = ops.down_combine(
        h, w.down_proj, order, offsets, weights, num_tokens, top_k, bias=w.down_bias, tiles=tiles
    )
    saved = Saved(hidden, order, offsets, h, preact, tiles, hidden.dtype) if keep else None
    return out, saved


def _expert_of_row(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The expert of each kept sorted row (a host sync: only the biases' gradients need it)."""
    counts = (offsets[1:] - offsets[:-1]).long()
    experts = torch.arange(counts.numel(), device=offsets.device).repeat_interleave(counts)
    return experts[:num_rows]


def triton_backward(
    grad_out: torch.Tensor, saved: Saved, top_k_weights: torch.Tensor, w: ExpertWeights, needs: list[bool]
) -> list[torch.Tensor | None]:
    """[d hidden, d top_k_weights, d gate_up_proj, d down_proj, d gate_up_bias, d down_bias] (None where not
    needed) in the inputs' dtypes."""
    hidden, order, offsets, h, preact, tiles = saved[:6]
    need_hidden, need_weights, need_gate_up, need_down, need_gate_up_bias, need_down_bias = needs
    num_tokens, top_k = top_k_weights.shape
    weights = top_k_weights.reshape(-1).contiguous()
    grad_out = grad_out.to(hidden.dtype)
    grads: list[torch.Tensor | None] = [None] * 6
    kept = int(offsets[-1]) if w.gate_up_bias is not None or w.down_bias is not None else 0
    rows, experts = order[:kept].long(), _expert_of_row(offsets, kept)
    if need_down:
        grads[3] = ops.grouped_weight_grad(
            grad_out, h, order, offsets, top_k, gather_a=True, gather_b=False,
            out=torch.empty_like(w.down_proj), scale=weights, tiles=tiles,
        )  # fmt: skip
    if need_down_bias:
        scaled = grad_out[rows // top_k].float() * weights[rows, None].float()
        grads[5] = torch.zeros(w.down_bias.shape, device=hidden.device).index_add_(0, experts, scaled)
        grads[5] = grads[5].to(w.down_bias.dtype)
    if not (need_hidden or need_weights or need_gate_up or need_gate_up_bias):
        return grads
    d_preact, grad_w = ops.down_backward(
        grad_out, w.down_proj, preact, order, offsets, weights, top_k, epilogue=_epilogue(w), tiles=tiles
    )
    if w.down_bias is not None:  # the routing weight also scales the down bias
        bias_term = (grad_out[rows // top_k].float() * w.down_bias[experts].float()).sum(1)
        grad_w = grad_w.index_add(0, rows, bias_term)
    grads[1] = grad_w.view(num_tokens, top_k).to(top_k_weights.dtype)
    if w.fn.interleaved:  # back to the weight's row order: gate0, up0, gate1, up1, ...
        n, width = d_preact.shape
        d_preact = d_preact.view(n, 2, width // 2).transpose(1, 2).reshape(n, width)
    if need_gate_up_bias:
        grads[4] = torch.zeros(w.gate_up_bias.shape, device=hidden.device)
        grads[4] = grads[4].index_add_(0, experts, d_preact[:kept].float()).to(w.gate_up_bias.dtype)
    if need_gate_up:
        grads[2] = ops.grouped_weight_grad(
            d_preact, hidden, order, offsets, top_k, gather_a=False, gather_b=True,
            out=torch.empty_like(w.gate_up_proj), tiles=tiles,
        )  # fmt: skip
    if need_hidden:
        slots = torch.empty(num_tokens * top_k, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        ops.grouped_gemm(
            d_preact, w.gate_up_proj, order, offsets, top_k, gather_a=False, out=slots,
            transpose_weight=True, tiles=tiles,
        )  # fmt: skip
        grads[0] = ops.combine_slots(slots, order, offsets, num_tokens, top_k)
    return grads


class _TritonMoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, tiles, keep_for_backward):
        w = ExpertWeights(gate_up_proj, down_proj)
        out, saved = triton_forward(hidden, top_k_index, top_k_weights, w, keep_for_backward, tiles)
        if keep_for_backward:
            ctx.save_for_backward(top_k_weights, gate_up_proj, down_proj)
            ctx.saved = saved
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        top_k_weights, gate_up_proj, down_proj = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = [n[0], n[2], n[3], n[4], False, False]
        grads = triton_backward(
            grad_out, ctx.saved, top_k_weights, ExpertWeights(gate_up_proj, down_proj), needs
        )
        return grads[0], None, grads[1], grads[2], grads[3], None, None


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
    GPU and small under the interpreter. Other expert functions and biases: `moekit.moe_forward` with
    backend="triton".
    """
    _check(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj)
    # Decided here, not from ctx.needs_input_grad, which stays True under torch.no_grad() for parameters
    # that require grad (the usual inference case): inference must not keep the [T*k, 2I] pre-activations.
    differentiable = (hidden, top_k_weights, gate_up_proj, down_proj)
    keep_for_backward = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    return _TritonMoEExperts.apply(
        hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, tiles, keep_for_backward
    )
