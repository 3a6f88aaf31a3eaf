"""Routers: a gate over the experts and a rule from its logits to (top-k weights, top-k expert ids), plus the
training extras (jitter, the auxiliary losses, capacity).

Each variant is one `Router` subclass, registered in ROUTERS by its `name`; `route(logits, k, name)` applies a
variant's rule without a module. Every variant returns a `Routing(weights [T, k], indices [T, k])` with weights in float32 (the routers of
Mixtral, Qwen and DeepSeek all compute their probabilities in float32) and indices in int64.

An index equal to `num_experts` marks an assignment that was dropped (capacity overflow). It carries weight 0
and every expert backend skips it; transformers' `eager` experts skip it too (its one-hot has an extra column).
"""

from __future__ import annotations

import inspect
import math
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from moekit.errors import UserError, did_you_mean


class Routing(NamedTuple):
    """Top-k routing for T tokens: `weights` [T, k] scale each expert's output, `indices` [T, k] pick it."""

    weights: torch.Tensor
    indices: torch.Tensor


class Router(nn.Linear):
    """A router: the gate `weight` [E, H] (transformers' `gate.weight`; `router(x)` gives the logits [T, E])
    and a rule, `choose`, from logits to each token's experts. Subclasses name themselves and register in
    ROUTERS by defining `name`: a new router is one class. `options` are keyword arguments of its `choose`
    (SigmoidBiasTopK's num_groups, ExpertChoice's capacity_factor), kept on the instance for `select`."""

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in ROUTERS:
                raise RuntimeError(f"router {cls.name!r} registered twice")
            ROUTERS[cls.name] = cls

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, device=None, dtype=None, **options):
        super().__init__(hidden_size, num_experts, bias=False, device=device, dtype=dtype)
        check_top_k(top_k, num_experts)
        inspect.signature(self.choose).bind(
            None, top_k, **options
        )  # a misspelt option fails here, not in forward
        self.top_k, self.options = top_k, options

    @staticmethod
    def choose(logits: torch.Tensor, top_k: int) -> Routing:
        """The rule on its own: logits [T, E] -> Routing [T, k]."""
        raise NotImplementedError

    def select(self, logits: torch.Tensor) -> Routing:
        """This router's choice for `logits` (self(x)), with its own top k, options and state."""
        return self.choose(logits, self.top_k, **self.options)

    def extra_repr(self) -> str:
        return f"{self.name}, hidden={self.in_features}, experts={self.out_features}, top_k={self.top_k}"


ROUTERS: dict[str, type[Router]] = {}


class SoftmaxTopK(Router):
    """Qwen2-MoE with `norm_topk_prob=False`: softmax over all experts, keep the top k as they are."""

    name = "softmax_topk"

    @staticmethod
    def choose(logits: torch.Tensor, top_k: int) -> Routing:
        probs = torch.softmax(logits.float(), dim=-1)
        weights, indices = torch.topk(probs, top_k, dim=-1)
        return Routing(weights, indices)


class SoftmaxTopKRenorm(Router):
    """Mixtral: softmax over all experts, keep the top k, renormalise the kept probabilities to sum to 1."""

    name = "softmax_topk_renorm"

    @staticmethod
    def choose(logits: torch.Tensor, top_k: int) -> Routing:
        weights, indices = SoftmaxTopK.choose(logits, top_k)
        return Routing(weights / weights.sum(dim=-1, keepdim=True), indices)


class TopKSoftmax(Router):
    """Top k of the logits first, then a softmax over those k only (Switch/GShard-style "top-k then normalise")."""

    name = "topk_softmax"

    @staticmethod
    def choose(logits: torch.Tensor, top_k: int) -> Routing:
        top_logits, indices = torch.topk(logits.float(), top_k, dim=-1)
        return Routing(torch.softmax(top_logits, dim=-1), indices)


class SigmoidBiasTopK(Router):
    """DeepSeek-V3: sigmoid scores; the `selection_bias` buffer [E] (transformers' `e_score_correction_bias`,
    updated by `moekit.runtime.balancing`) steers the choice but not the weights.

    With `num_groups > 1` the experts are split into equal groups, each group is scored by the sum of its two
    best biased scores, and only the `groups_per_token` best groups are eligible. The kept weights are the
    unbiased sigmoid scores, optionally renormalised, times `scaling_factor`.
    """

    name = "sigmoid_bias_topk"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, device=None, **options):
        super().__init__(hidden_size, num_experts, top_k, device=device, **options)
        self.register_buffer("selection_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))

    def select(self, logits: torch.Tensor) -> Routing:
        return self.choose(logits, self.top_k, self.selection_bias, **self.options)

    @staticmethod
    def choose(
        logits: torch.Tensor,
        top_k: int,
        bias: torch.Tensor | None = None,
        *,
        num_groups: int = 1,
        groups_per_token: int = 1,
        normalize: bool = True,
        scaling_factor: float = 1.0,
    ) -> Routing:
        scores = torch.sigmoid(logits.float())
        choice = scores if bias is None else scores + bias.float()
        num_experts = scores.shape[-1]
        if num_groups > 1:
            if num_experts % num_groups:
                raise UserError(
                    f"sigmoid routing: {num_experts} experts do not split into {num_groups} equal groups"
                )
            grouped = choice.view(*choice.shape[:-1], num_groups, num_experts // num_groups)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
            best_groups = group_scores.topk(groups_per_token, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, best_groups, True)
            expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(choice.shape)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        indices = torch.topk(choice, top_k, dim=-1).indices
        weights = scores.gather(-1, indices)
        if normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(weights * scaling_factor, indices)


class ExpertChoice(Router):
    """Expert Choice (Zhou et al. 2022): each expert takes its `capacity` best tokens by softmax score.

    capacity = ceil(capacity_factor · T · top_k / E), so on average a token gets `top_k` experts (some get
    none, some more). Returns weights and indices [T, E]: slot e holds expert e with its softmax score when
    expert e chose the token, else index E (dropped) and weight 0."""

    name = "expert_choice"

    @staticmethod
    def choose(logits: torch.Tensor, top_k: int, capacity_factor: float = 1.0) -> Routing:
        if capacity_factor <= 0:
            raise UserError(f"expert choice: capacity_factor={capacity_factor} must be positive")
        num_tokens, num_experts = logits.shape
        probs = torch.softmax(logits.float(), dim=-1)
        capacity = min(num_tokens, expert_capacity(num_tokens, top_k, num_experts, capacity_factor))
        tokens = probs.t().topk(capacity, dim=-1).indices  # [E, c]: each expert's chosen tokens
        chosen = torch.zeros(num_experts, num_tokens, dtype=torch.bool, device=logits.device)
        chosen.scatter_(1, tokens, True)
        chosen = chosen.t()  # [T, E]
        experts = torch.arange(num_experts, device=logits.device).expand(num_tokens, -1)
        indices = torch.where(chosen, experts, num_experts)
        weights = torch.where(chosen, probs, torch.zeros_like(probs))
        return Routing(weights, indices)


def router_class(name: str, where: str = "") -> type[Router]:
    """The Router subclass registered as `name`; a misspelling is a UserError with "did you mean"."""
    if name not in ROUTERS:
        raise UserError(
            f"{where + ': ' if where else ''}unknown router {name!r}{did_you_mean(name, ROUTERS)}; choose one of {', '.join(ROUTERS)}"
        )
    return ROUTERS[name]


def check_top_k(top_k: int, num_experts: int) -> None:
    if not 1 <= top_k <= num_experts:
        raise UserError(f"top_k={top_k} must be between 1 and the number of experts ({num_experts})")


def route(logits: torch.Tensor, top_k: int, method: str = "softmax_topk_renorm", **options) -> Routing:
    """Route with the rule of the router named `method` (a key of `ROUTERS`); `options` go to its `choose`."""
    rule = router_class(method).choose
    check_top_k(top_k, logits.shape[-1])
    return rule(logits, top_k, **options)


def jitter(hidden: torch.Tensor, noise: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Multiply the router input by U(1 - noise, 1 + noise) elementwise (Switch Transformer / Mixtral training).

    Returns a new tensor; use it for the router only during training.
    """
    if noise <= 0:
        return hidden
    scale = torch.empty_like(hidden).uniform_(1.0 - noise, 1.0 + noise, generator=generator)
    return hidden * scale


def load_balancing_loss(
    router_logits: torch.Tensor, indices: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer auxiliary loss E · Σᵢ fᵢ · Pᵢ.

    fᵢ: top-k assignments to expert i per token (summed over the k slots, so Σᵢ fᵢ = k), Pᵢ: the mean
    softmax probability of expert i. This is transformers' `load_balancing_loss_func` for one layer; it is
    k at perfect balance. Only Pᵢ carries a gradient. `token_mask` [T] (bool) excludes padding tokens.
    Pass the router's choice before `drop_over_capacity`: the loss is about what the router wants.
    """
    num_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float().reshape(-1, num_experts), dim=-1)
    flat_indices = indices.reshape(probs.shape[0], -1)
    keep = (
        torch.ones(probs.shape[0], device=probs.device)
        if token_mask is None
        else token_mask.reshape(-1).float()
    )
    valid = flat_indices < num_experts
    assignments = torch.zeros(num_experts + 1, device=probs.device).index_add_(
        0,
        torch.where(valid, flat_indices, num_experts).reshape(-1),
        keep.repeat_interleave(flat_indices.shape[1]),
    )[:num_experts]
    num_tokens = keep.sum()
    fraction = assignments / num_tokens
    mean_prob = (probs * keep[:, None]).sum(dim=0) / num_tokens
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: the mean over tokens of logsumexp(logits)², which keeps router logits small."""
    flat = router_logits.float().reshape(-1, router_logits.shape[-1])
    return torch.logsumexp(flat, dim=-1).square().mean()


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor · T · k / E)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def drop_over_capacity(routing: Routing, num_experts: int, capacity_factor: float | None) -> Routing:
    """Drop assignments beyond each expert's capacity; `capacity_factor=None` is dropless (returns `routing`).

    Priority follows GShard/Switch: every token's first choice before any token's second choice, and within
    one choice rank, earlier tokens first. A dropped assignment gets index `num_experts` and weight 0; the
    surviving weights are not renormalised (the token's residual stream carries what was dropped).
    """
    if capacity_factor is None:
        return routing
    if capacity_factor <= 0:
        raise UserError(f"capacity_factor={capacity_factor} must be positive (or None for dropless routing)")
    num_tokens, top_k = routing.indices.shape
    capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    # Slot-major order: row r of `by_priority` is (choice rank r // T, token r % T).
    by_priority = routing.indices.t().reshape(-1)
    one_hot = torch.nn.functional.one_hot(by_priority.clamp(max=num_experts), num_experts + 1)
    position_in_expert = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
    kept = ((position_in_expert < capacity) & (by_priority < num_experts)).reshape(top_k, num_tokens).t()
    indices = torch.where(kept, routing.indices, num_experts)
    weights = torch.where(kept, routing.weights, torch.zeros_like(routing.weights))
    return Routing(weights, indices)
