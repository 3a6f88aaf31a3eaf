"""`moe_forward`: the functional core of an MoE layer's experts, one entry point for every backend.

The experts are one op, `torch.ops.moekit.experts`, with a fake (shape) implementation and an autograd formula,
so torch.compile(fullgraph=True) and torch.export trace through an MoE layer without graph breaks: sorting by
expert, the backend's path choice and every host sync happen inside the op. In eager mode the same backend
functions run through an autograd.Function instead, which skips the op dispatcher's overhead (60-250 µs a call
measured here, a decode step's worth) and keeps the pre-activations for backward instead of recomputing them.
"""

from __future__ import annotations

import torch

from moekit.errors import UserError
from moekit.runtime.activations import SWIGLU, ExpertFunction
from moekit.runtime.backends import BACKENDS, choose_backend
from moekit.runtime.expert_weights import ExpertWeights
from moekit.runtime.routing import route


def _check_shapes(hidden: torch.Tensor, w: ExpertWeights) -> None:
    num_experts, width, hidden_size = w.gate_up_proj.shape
    inter = width // 2 if w.fn.gated else width
    if hidden.shape[-1] != hidden_size or (w.fn.gated and width % 2):
        rows = "2I" if w.fn.gated else "I"
        raise UserError(
            f"moe_forward: gate_up_proj {tuple(w.gate_up_proj.shape)} must be [E, {rows}, H] with H = hidden size "
            f"{hidden.shape[-1]}"
        )
    if tuple(w.down_proj.shape) != (num_experts, hidden_size, inter):
        raise UserError(
            f"moe_forward: down_proj {tuple(w.down_proj.shape)} must be [E, H, I] = "
            f"{(num_experts, hidden_size, inter)} to match gate_up_proj {tuple(w.gate_up_proj.shape)}"
        )
    for name, bias, size in (
        ("gate_up_bias", w.gate_up_bias, width),
        ("down_bias", w.down_bias, hidden_size),
    ):
        if bias is not None and tuple(bias.shape) != (num_experts, size):
            raise UserError(f"moe_forward: {name} {tuple(bias.shape)} must be [E, {size}]")


def moe_forward(
    hidden: torch.Tensor,
    router_logits_or_indices: torch.Tensor,
    weights: torch.Tensor | None,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    top_k: int | None = None,
    router: str = "softmax_topk_renorm",
    backend: str = "auto",
    expert_fn: ExpertFunction = SWIGLU,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Experts: Σⱼ weights[t, j] · (down[e] · f(gate_up[e] · x + b₁[e]) + b₂[e]) with e = indices[t, j].

    f is `expert_fn` (default SiLU-gated: silu(gate) ⊙ up). hidden: [..., H]. Either pass router logits
    [..., E] (floating, `weights=None`, `top_k` set; `router` names the variant in
    `moekit.runtime.routing.ROUTERS`), or the top-k expert ids [..., k] (integer) with their weights [..., k].
    gate_up_proj: [E, 2I, H] (gated; gate rows then up rows, or interleaved with `expert_fn.interleaved`) or
    [E, I, H] (not gated), and down_proj: [E, H, I], as in transformers; pass a transposed layout as a
    `.transpose(1, 2)` view. Optional biases: gate_up_bias [E, 2I or I], down_bias [E, H]. Ids outside [0, E)
    are dropped assignments. Returns [..., H] in hidden's dtype, differentiable in hidden, the routing weights
    (or logits), the weights and the biases. `backend`: auto, torch, triton or megablocks.
    """
    w = ExpertWeights(gate_up_proj, down_proj, gate_up_bias, down_bias, expert_fn)
    _check_shapes(hidden, w)
    lead_shape, hidden_size = hidden.shape[:-1], hidden.shape[-1]
    if router_logits_or_indices.is_floating_point():
        if weights is not None or top_k is None:
            raise UserError("moe_forward: with router logits pass top_k=... and weights=None")
        weights, indices = route(router_logits_or_indices.reshape(-1, gate_up_proj.shape[0]), top_k, router)
    else:
        if weights is None or weights.shape != router_logits_or_indices.shape:
            raise UserError(
                f"moe_forward: expert ids {tuple(router_logits_or_indices.shape)} need routing weights of the "
                f"same shape, got {None if weights is None else tuple(weights.shape)}"
            )
        indices = router_logits_or_indices.reshape(-1, router_logits_or_indices.shape[-1])
        weights = weights.reshape(indices.shape)
    out = run_experts(hidden.reshape(-1, hidden_size), indices, weights, w, backend)
    return out.reshape(*lead_shape, hidden_size)


def run_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w: ExpertWeights,
    backend: str,
) -> torch.Tensor:
    """hidden [T, H], top_k_index / top_k_weights [T, k] -> [T, H] through the chosen backend."""
    name = choose_backend(backend, hidden.device, w)
    if _tracing():
        fn = w.fn
        return torch.ops.moekit.experts(
            hidden, top_k_index, top_k_weights, w.gate_up_proj, w.down_proj, w.gate_up_bias, w.down_bias,
            fn.activation, fn.gated, fn.interleaved, fn.alpha, fn.limit, name,
        )  # fmt: skip
    impl = BACKENDS[name]
    differentiable = (hidden, top_k_weights, *w.tensors())
    if impl.backward is None or not (
        torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    ):
        return impl.forward(hidden, top_k_index, top_k_weights, w, False)[0]
    return _Experts.apply(hidden, top_k_index, top_k_weights, name, w.fn, *w[:4])


def _tracing() -> bool:
    """Under dynamo, torch.export or a fake-tensor trace the op must appear in the graph."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


class _Experts(torch.autograd.Function):
    """Eager autograd over a backend's forward/backward; keeps what the backend saves."""

    @staticmethod
    def forward(
        ctx, hidden, top_k_index, top_k_weights, name, fn, gate_up_proj, down_proj, gate_up_bias, down_bias
    ):
        w = ExpertWeights(gate_up_proj, down_proj, gate_up_bias, down_bias, fn)
        out, saved = BACKENDS[name].forward(hidden, top_k_index, top_k_weights, w, True)
        ctx.save_for_backward(top_k_weights, *w[:4])
        ctx.saved, ctx.name, ctx.fn = saved, name, fn
        return out

    @staticmethod
    def backward(ctx, grad_out):
        top_k_weights, *tensors = ctx.saved_tensors
        w = ExpertWeights(*tensors, ctx.fn)
        n = ctx.needs_input_grad
        needs = [n[0], n[2], n[5], n[6], n[7], n[8]]
        grads = BACKENDS[ctx.name].backward(grad_out, ctx.saved, top_k_weights, w, needs)
        grad_x, grad_w, grad_gate_up, grad_down, grad_gate_up_bias, grad_down_bias = grads
        return grad_x, None, grad_w, None, None, grad_gate_up, grad_down, grad_gate_up_bias, grad_down_bias


# ---- the op -------------------------------------------------------------------------------------------------


def _weights(gate_up_proj, down_proj, gate_up_bias, down_bias, activation, gated, interleaved, alpha, limit):
    fn = ExpertFunction(activation, gated, interleaved, alpha, limit)
    return ExpertWeights(gate_up_proj, down_proj, gate_up_bias, down_bias, fn)


@torch.library.custom_op("moekit::experts", mutates_args=())
def _experts_op(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    activation: str,
    gated: bool,
    interleaved: bool,
    alpha: float,
    limit: float,
    backend: str,
) -> torch.Tensor:
    w = _weights(
        gate_up_proj, down_proj, gate_up_bias, down_bias, activation, gated, interleaved, alpha, limit
    )
    return BACKENDS[backend].forward(hidden, top_k_index, top_k_weights, w, False)[0]


@_experts_op.register_fake
def _(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, *options):
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op("moekit::experts_backward", mutates_args=())
def _experts_backward_op(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    activation: str,
    gated: bool,
    interleaved: bool,
    alpha: float,
    limit: float,
    backend: str,
    needs: list[bool],
) -> list[torch.Tensor]:
    """The gradients of `moekit::experts`, an empty tensor where not needed; the forward pass is rerun with
    `keep` (an op's outputs are all it can hand to its backward)."""
    w = _weights(
        gate_up_proj, down_proj, gate_up_bias, down_bias, activation, gated, interleaved, alpha, limit
    )
    impl = BACKENDS[backend]
    _, saved = impl.forward(hidden, top_k_index, top_k_weights, w, True)
    grads = impl.backward(grad_out.contiguous(), saved, top_k_weights, w, needs)
    return [hidden.new_empty(0) if g is None else g for g in grads]


@_experts_backward_op.register_fake
def _(grad_out, hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, *rest):
    needs = rest[-1]
    like = (hidden, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias)
    return [
        torch.empty_like(t) if need and t is not None else hidden.new_empty(0) for t, need in zip(like, needs)
    ]


def _setup_context(ctx, inputs, output):
    hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, *options = inputs
    ctx.save_for_backward(
        hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias
    )
    ctx.options = options


def _backward(ctx, grad_out):
    hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[2], n[3], n[4], n[5] and gate_up_bias is not None, n[6] and down_bias is not None]
    grads = torch.ops.moekit.experts_backward(
        grad_out, hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
        *ctx.options, needs,
    )  # fmt: skip
    grad_x, grad_w, grad_gate_up, grad_down, grad_gate_up_bias, grad_down_bias = (
        g if need else None for g, need in zip(grads, needs)
    )
    return (grad_x, None, grad_w, grad_gate_up, grad_down, grad_gate_up_bias, grad_down_bias) + (None,) * 6


_experts_op.register_autograd(_backward, setup_context=_setup_context)
