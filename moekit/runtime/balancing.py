"""Routers and load balancing from the papers: Expert Choice, noisy top-k gating with its importance and load
losses, DeepSeek-V3's auxiliary-loss-free bias update (with an optimizer hook) and its sequence-level loss.

Each is a plain function on router logits (or a small module holding its own router weights), so it works in
`MoELayer`, in a training loop, or with `moe_forward` directly. Expert Choice is the `expert_choice` router
of `moekit.runtime.routing.ROUTERS`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import UserError
from moekit.runtime.routing import Routing


def _cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, var / mean² (Shazeer et al.'s balance measure); 0 for one value."""
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.float().var() / (values.float().mean() ** 2 + 1e-10)


class NoisyTopKGate(nn.Module):
    """Noisy top-k gating (Shazeer et al. 2017): H = x·W_g + ε·softplus(x·W_noise), ε ~ N(0, 1) while
    training; the top k of H are kept and softmaxed. `losses` returns the importance and load losses,
    CV(Σₓ G(x))² and CV(Σₓ P(x))², where P(x)ᵢ is the probability, over fresh noise, that expert i stays in
    the top k. Weights match `MoELayer.router` ([E, H] `weight`) plus `noise_weight` [E, H]."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k < num_experts:
            raise UserError(
                f"noisy top-k: top_k={top_k} must be at least 1 and below num_experts={num_experts}"
            )
        self.top_k = top_k
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, device=device, dtype=dtype))
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size, device=device, dtype=dtype))

    def forward(self, hidden: torch.Tensor, generator: torch.Generator | None = None):
        """hidden [T, H] -> (Routing [T, k], clean logits [T, E], noise std [T, E], noisy logits [T, E])."""
        clean = F.linear(hidden, self.weight).float()
        if self.training:
            std = F.softplus(F.linear(hidden, self.noise_weight).float()) + 1e-2
            noise = torch.randn(clean.shape, generator=generator, device=clean.device)
            noisy = clean + noise * std
        else:
            std, noisy = None, clean
        top, indices = noisy.topk(self.top_k, dim=-1)
        return Routing(torch.softmax(top, dim=-1), indices), clean, std, noisy

    def losses(self, routing: Routing, clean, std, noisy) -> tuple[torch.Tensor, torch.Tensor]:
        """(importance loss, load loss) of one forward's outputs; the load loss needs the training noise."""
        gates = torch.zeros_like(clean).scatter(1, routing.indices, routing.weights)
        importance = _cv_squared(gates.sum(0))
        if std is None:
            return importance, clean.new_zeros(())
        return importance, _cv_squared(load_probability(clean, std, noisy, self.top_k).sum(0))


def load_probability(clean: torch.Tensor, std: torch.Tensor, noisy: torch.Tensor, top_k: int) -> torch.Tensor:
    """P(x, i) = Φ((clean_i − kth_excluding(noisy, k, i)) / std_i): the chance that expert i is in the top k
    with fresh noise on its own logit only. kth_excluding is the k-th largest noisy logit among the others:
    the (k+1)-th largest overall when i is in the top k, else the k-th."""
    top = noisy.topk(top_k + 1, dim=-1).values
    in_top = noisy >= top[:, top_k - 1 : top_k]
    threshold = torch.where(in_top, top[:, top_k : top_k + 1], top[:, top_k - 1 : top_k])
    return torch.distributions.Normal(0.0, 1.0).cdf((clean - threshold) / std)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, averaged over sequences: Σᵢ fᵢ Pᵢ per sequence with
    fᵢ = E / (k·S) · #(tokens choosing i) and Pᵢ = mean over the sequence of the normalised scores sᵢ / Σⱼ sⱼ.

    scores: [B·S, E] router affinities (sigmoid for DeepSeek-V3, softmax also works), indices [B·S, k], tokens
    ordered sequence by sequence. It is 1 at perfect balance within every sequence."""
    tokens, num_experts = scores.shape
    if tokens % num_sequences:
        raise UserError(f"sequence balance loss: {tokens} tokens do not split into {num_sequences} sequences")
    top_k = indices.shape[-1]
    seq = tokens // num_sequences
    normalised = scores.float() / scores.float().sum(-1, keepdim=True)
    valid = indices < num_experts
    counts = torch.zeros(num_sequences, num_experts + 1, device=scores.device)
    flat = torch.where(valid, indices, num_experts).reshape(num_sequences, -1)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=counts.dtype))
    fraction = counts[:, :num_experts] * num_experts / (top_k * seq)
    mean_score = normalised.view(num_sequences, seq, num_experts).mean(1)
    return (fraction * mean_score).sum(-1).mean()


def expert_load(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert [E] (float32); dropped ids (outside [0, E)) are not counted."""
    flat = indices.reshape(-1)
    flat = flat[(flat >= 0) & (flat < num_experts)]
    return torch.bincount(flat, minlength=num_experts).float()


def load_cv(indices: torch.Tensor, num_experts: int) -> float:
    """Coefficient of variation (std / mean) of the per-expert load; 0 is perfectly balanced."""
    load = expert_load(indices, num_experts)
    return (load.std(unbiased=False) / load.mean().clamp_min(1e-10)).item()


@torch.no_grad()
def update_selection_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free balancing: bᵢ ← bᵢ + γ·sign(mean load − loadᵢ), in place.

    Overloaded experts become less likely to be chosen, underloaded ones more; the bias steers only the
    choice (`sigmoid_bias_topk`), never the weights, so no gradient is involved."""
    bias.add_(torch.sign(load.mean() - load.float()), alpha=rate)
    return bias


class LoadTracker:
    """Accumulates the per-expert load of the routings it is given, for `update_selection_bias`."""

    def __init__(self, bias: torch.Tensor):
        self.bias = bias
        self.load = torch.zeros_like(bias, dtype=torch.float32)

    def observe(self, indices: torch.Tensor) -> None:
        self.load += expert_load(indices.detach(), self.bias.numel()).to(self.load.device)

    def step(self, rate: float) -> None:
        """Apply one bias update from the load seen since the last step, then forget it."""
        if self.load.sum() > 0:
            update_selection_bias(self.bias, self.load, rate)
        self.load.zero_()


def register_bias_update_hook(optimizer: torch.optim.Optimizer, trackers: Iterable[LoadTracker], rate: float):
    """After every `optimizer.step()`, update each tracker's selection bias from the load it observed (as
    torchtitan does for DeepSeek-V3). Returns the hook handle (`.remove()` to stop)."""
    trackers = list(trackers)

    def hook(optimizer, args, kwargs):
        for tracker in trackers:
            tracker.step(rate)

    return optimizer.register_step_post_hook(hook)
