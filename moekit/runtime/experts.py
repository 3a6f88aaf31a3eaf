"""`moe_forward`: the functional core of an MoE layer's experts, one entry point for every backend."""

from __future__ import annotations

import torch

from moekit.errors import UserError
from moekit.runtime.backends import BACKENDS, choose_backend
from moekit.runtime.routing import route


def _check_shapes(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
    num_experts, two_inter, hidden_size = gate_up_proj.shape
    if hidden.shape[-1] != hidden_size or two_inter % 2:
        raise UserError(
            f"moe_forward: gate_up_proj {tuple(gate_up_proj.shape)} must be [E, 2I, H] with H = hidden size "
            f"{hidden.shape[-1]}"
        )
    if tuple(down_proj.shape) != (num_experts, hidden_size, two_inter // 2):
        raise UserError(
            f"moe_forward: down_proj {tuple(down_proj.shape)} must be [E, H, I] = "
            f"{(num_experts, hidden_size, two_inter // 2)} to match gate_up_proj {tuple(gate_up_proj.shape)}"
        )


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
) -> torch.Tensor:
    """SwiGLU experts: Σⱼ weights[t, j] · down[e] · (silu(gate[e] · x) ⊙ up[e] · x) with e = indices[t, j].

    hidden: [..., H]. Either pass router logits [..., E] (floating, `weights=None`, `top_k` set; `router` names
    the variant in `moekit.runtime.routing.ROUTERS`), or the top-k expert ids [..., k] (integer) with their
    weights [..., k]. gate_up_proj: [E, 2I, H] (gate rows, then up rows) and down_proj: [E, H, I], as in
    transformers. Ids outside [0, E) are dropped assignments. Returns [..., H] in hidden's dtype, differentiable
    in hidden, the routing weights (or logits) and both weights. `backend`: auto, torch, triton or megablocks.
    """
    _check_shapes(hidden, gate_up_proj, down_proj)
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
    experts = BACKENDS[choose_backend(backend, hidden.device)]
    out = experts(hidden.reshape(-1, hidden_size), indices, weights, gate_up_proj, down_proj)
    return out.reshape(*lead_shape, hidden_size)
