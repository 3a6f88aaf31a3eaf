"""`MoELayer`: a plain torch.nn.Module sparse MoE block, a router plus an experts module, for users' own models."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import UserError
from moekit.runtime.experts import moe_forward
from moekit.runtime.routing import (
    Router,
    drop_over_capacity,
    jitter,
    load_balancing_loss,
    router_class,
    router_z_loss,
)


class MoEOutput(NamedTuple):
    """What `MoELayer.forward` returns: the output and what a training loop adds to its loss."""

    hidden: torch.Tensor  # [..., H], the layer output
    router_logits: torch.Tensor  # [T, E]
    load_balancing_loss: torch.Tensor  # scalar, E · Σ fᵢ Pᵢ (k when perfectly balanced)
    z_loss: torch.Tensor  # scalar, mean logsumexp(logits)²


def _uniform_init(weight: torch.Tensor) -> None:
    """Kaiming-uniform over the last dimension, the init nn.Linear gives each expert's projection."""
    bound = 1.0 / math.sqrt(weight.shape[-1])
    nn.init.uniform_(weight, -bound, bound)


class Experts(nn.Module):
    """SwiGLU experts in transformers' fused layout, `gate_up_proj` [E, 2I, H] (gate rows, then up rows) and
    `down_proj` [E, H, I], run by `moe_forward` with `backend`. forward(hidden, top_k_index, top_k_weights) is
    transformers' experts signature, so any module with it (`ExpertParallelExperts`, a transformers experts
    module) can stand in its place in a `MoELayer`."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, backend: str = "auto"):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up_proj)
        self.down_proj = nn.Parameter(down_proj)
        self.backend = backend

    def reset_parameters(self) -> None:
        _uniform_init(self.gate_up_proj)
        _uniform_init(self.down_proj)

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return moe_forward(
            hidden, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, backend=self.backend
        )

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_proj.shape
        return f"experts={e}, hidden={h}, intermediate={two_i // 2}, backend={self.backend}"


class SharedExpert(nn.Module):
    """An always-on SwiGLU expert (`gate_up_proj` [2Iₛ, H], `down_proj` [H, Iₛ]) added to every token's output,
    scaled by sigmoid(`gate`(x)) when `gated` (Qwen2-MoE's layout; DeepSeek's shared experts have no gate)."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, gated: bool = False):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up_proj)
        self.down_proj = nn.Parameter(down_proj)
        hidden_size = gate_up_proj.shape[1]
        factory = {"device": gate_up_proj.device, "dtype": gate_up_proj.dtype}
        self.gate = nn.Linear(hidden_size, 1, bias=False, **factory) if gated else None

    def reset_parameters(self) -> None:
        _uniform_init(self.gate_up_proj)
        _uniform_init(self.down_proj)
        if self.gate is not None:
            self.gate.reset_parameters()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(hidden, self.gate_up_proj).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, self.down_proj)
        return out if self.gate is None else torch.sigmoid(self.gate(hidden)) * out


class MoELayer(nn.Module):
    """A router (`moekit.runtime.routing.Router`: its `weight` [E, H] is transformers' `gate.weight`) and an
    experts module (`Experts`, or anything with its forward), plus an optional `SharedExpert`.

    jitter_noise: multiplicative router-input noise while training. capacity_factor: None is dropless; a
    number drops assignments past ceil(factor · T · k / E) per expert. `MoELayer.build` makes one from sizes.
    """

    def __init__(
        self,
        router: Router,
        experts: nn.Module,
        *,
        shared_expert: SharedExpert | None = None,
        jitter_noise: float = 0.0,
        capacity_factor: float | None = None,
    ):
        super().__init__()
        self.router, self.experts, self.shared_expert = router, experts, shared_expert
        self.jitter_noise, self.capacity_factor = jitter_noise, capacity_factor

    @classmethod
    def build(
        cls,
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
    ) -> MoELayer:
        """A freshly initialised layer: `router` names a variant in `moekit.runtime.routing.ROUTERS` (built with
        its defaults), SwiGLU `Experts` run by `backend`, and a shared expert of `shared_expert_size`."""
        factory = {"device": device, "dtype": dtype}
        router_module = router_class(router, "MoELayer")(hidden_size, num_experts, top_k, **factory)
        experts = Experts(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory),
            torch.empty(num_experts, hidden_size, intermediate_size, **factory),
            backend,
        )
        shared = None
        if shared_expert_size:
            shared = SharedExpert(
                torch.empty(2 * shared_expert_size, hidden_size, **factory),
                torch.empty(hidden_size, shared_expert_size, **factory),
                gated=shared_expert_gate,
            )
        elif shared_expert_gate:
            raise UserError("MoELayer: shared_expert_gate needs a shared expert (set shared_expert_size)")
        layer = cls(
            router_module,
            experts,
            shared_expert=shared,
            jitter_noise=jitter_noise,
            capacity_factor=capacity_factor,
        )
        layer.reset_parameters()
        return layer

    @property
    def num_experts(self) -> int:
        return self.router.out_features

    def reset_parameters(self) -> None:
        """nn.Linear's init for the router, Kaiming-uniform per expert for the experts' projections."""
        for module in (self.router, self.experts, self.shared_expert):
            if module is not None:
                module.reset_parameters()

    def forward(self, hidden: torch.Tensor) -> MoEOutput:
        """hidden [..., H] -> MoEOutput; the losses are computed from the router's dropless choice."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = self.router(jitter(flat, self.jitter_noise) if self.training else flat)
        routing = self.router.select(logits)
        kept = drop_over_capacity(routing, self.num_experts, self.capacity_factor)
        out = self.experts(flat, kept.indices, kept.weights)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return MoEOutput(
            out.reshape(hidden.shape),
            logits,
            load_balancing_loss(logits, routing.indices),
            router_z_loss(logits),
        )

    def extra_repr(self) -> str:
        return f"jitter_noise={self.jitter_noise}, capacity_factor={self.capacity_factor}"
