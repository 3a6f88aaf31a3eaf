"""`MoELayer`: a plain torch.nn.Module sparse MoE block (router + SwiGLU experts) for users' own models."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import UserError, did_you_mean
from moekit.runtime.experts import moe_forward
from moekit.runtime.routing import (
    ROUTERS,
    drop_over_capacity,
    jitter,
    load_balancing_loss,
    route,
    router_z_loss,
)


class MoEOutput(NamedTuple):
    """What `MoELayer.forward` returns: the output and what a training loop adds to its loss."""

    hidden: torch.Tensor  # [..., H], the layer output
    router_logits: torch.Tensor  # [T, E]
    load_balancing_loss: torch.Tensor  # scalar, E · Σ fᵢ Pᵢ (k when perfectly balanced)
    z_loss: torch.Tensor  # scalar, mean logsumexp(logits)²


class MoELayer(nn.Module):
    """Router + experts. Weights match transformers: `router.weight` [E, H] (transformers' `gate.weight`),
    `gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `down_proj` [E, H, I].

    router: a variant in `moekit.runtime.routing.ROUTERS`; "sigmoid_bias_topk" uses the `router_bias` buffer
    [E] for the choice only (DeepSeek-V3). jitter_noise: multiplicative router-input noise while training.
    capacity_factor: None is dropless; a number drops assignments past ceil(factor · T · k / E) per expert.
    shared_expert_size: the intermediate size of an always-on SwiGLU expert (`shared_gate_up_proj` [2Iₛ, H],
    `shared_down_proj` [H, Iₛ]) added to every token's output, scaled by sigmoid(`shared_expert_gate`(x)) when
    `shared_expert_gate` (Qwen2-MoE's layout; DeepSeek's shared experts have no gate).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        router: str = "softmax_topk_renorm",
        jitter_noise: float = 0.0,
        capacity_factor: float | None = None,
        backend: str = "auto",
        shared_expert_size: int | None = None,
        shared_expert_gate: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if router not in ROUTERS:
            raise UserError(f"MoELayer: unknown router {router!r}{did_you_mean(router, ROUTERS)}")
        if not 1 <= top_k <= num_experts:
            raise UserError(f"MoELayer: top_k={top_k} must be between 1 and num_experts={num_experts}")
        factory = {"device": device, "dtype": dtype}
        self.num_experts, self.top_k = num_experts, top_k
        self.router_name, self.jitter_noise, self.capacity_factor, self.backend = (
            router,
            jitter_noise,
            capacity_factor,
            backend,
        )
        self.router = nn.Linear(hidden_size, num_experts, bias=False, **factory)
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.register_buffer("router_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        self.shared_gate_up_proj = self.shared_down_proj = self.shared_expert_gate = None
        if shared_expert_size:
            self.shared_gate_up_proj = nn.Parameter(
                torch.empty(2 * shared_expert_size, hidden_size, **factory)
            )
            self.shared_down_proj = nn.Parameter(torch.empty(hidden_size, shared_expert_size, **factory))
            if shared_expert_gate:
                self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, **factory)
        elif shared_expert_gate:
            raise UserError("MoELayer: shared_expert_gate needs a shared expert (set shared_expert_size)")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform per expert, the init nn.Linear would give each expert's projections."""
        self.router.reset_parameters()
        for weight in (self.gate_up_proj, self.down_proj, self.shared_gate_up_proj, self.shared_down_proj):
            if weight is not None:
                bound = 1.0 / math.sqrt(weight.shape[-1])
                nn.init.uniform_(weight, -bound, bound)
        if self.shared_expert_gate is not None:
            self.shared_expert_gate.reset_parameters()

    def forward(self, hidden: torch.Tensor) -> MoEOutput:
        """hidden [..., H] -> MoEOutput; the losses are computed from the router's dropless choice."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        router_input = jitter(flat, self.jitter_noise) if self.training else flat
        logits = self.router(router_input)
        options = {"bias": self.router_bias} if self.router_name == "sigmoid_bias_topk" else {}
        routing = route(logits, self.top_k, self.router_name, **options)
        kept = drop_over_capacity(routing, self.num_experts, self.capacity_factor)
        out = moe_forward(
            flat, kept.indices, kept.weights, self.gate_up_proj, self.down_proj, backend=self.backend
        )
        if self.shared_gate_up_proj is not None:
            gate, up = F.linear(flat, self.shared_gate_up_proj).chunk(2, dim=-1)
            shared = F.linear(F.silu(gate) * up, self.shared_down_proj)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return MoEOutput(
            out.reshape(hidden.shape),
            logits,
            load_balancing_loss(logits, routing.indices),
            router_z_loss(logits),
        )

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_proj.shape
        return (
            f"hidden={h}, intermediate={two_i // 2}, experts={e}, top_k={self.top_k}, router={self.router_name}, "
            f"capacity_factor={self.capacity_factor}, backend={self.backend}"
        )
