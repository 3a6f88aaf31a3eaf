"""Running sums of routing decisions, fed one batch at a time, so memory never grows with the prompt count."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_LN2 = float(np.log(2.0))


class NonFiniteRouting(ValueError):
    """The router of MoE layer slot `layer` gave NaN probabilities (its logits held NaN or +Inf) for `bad_tokens`
    of the `tokens` tokens of a batch: no statistic of such a run means anything."""

    def __init__(self, layer: int, bad_tokens: int, tokens: int):
        super().__init__(
            f"MoE layer slot {layer}: NaN router probabilities for {bad_tokens} of {tokens} tokens"
        )
        self.layer, self.bad_tokens, self.tokens = layer, bad_tokens, tokens


class RoutingAccumulator:
    """Sums over tokens of everything the metrics need, for L MoE layers with E experts and top-k routing.

    `add` takes the router logits of the non-padding tokens of one batch, one [T, E] tensor per MoE layer,
    and selects the top-k exactly as the Mixtral/Qwen-MoE routers do: top-k of softmax(logits in fp32).
    NaN probabilities raise `NonFiniteRouting` (before they reach any sum of that layer). All sums are int64 (counts) or float64 (probabilities), on the CPU.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        L, E = num_layers, num_experts
        self.tokens = 0
        self.counts = np.zeros((L, E), np.int64)
        self.top1_counts = np.zeros((L, E), np.int64)
        self.prob_sums = np.zeros((L, E), np.float64)
        self.entropy_bits_sums = np.zeros(L, np.float64)
        self.top1_prob_sums = np.zeros(L, np.float64)
        self.coselection = np.zeros((L, E, E), np.int64)
        self.adjacent_top1_agree = np.zeros(max(L - 1, 0), np.int64)
        self.adjacent_topk_shared = np.zeros(max(L - 1, 0), np.int64)
        self.label_counts: dict[str, np.ndarray] = {}
        self.label_tokens: dict[str, int] = {}

    def add(self, layer_logits: Sequence[torch.Tensor], label: str | None = None) -> None:
        """Account for one batch: `layer_logits[l]` is [T, E] for the same T tokens in every layer."""
        if len(layer_logits) != self.num_layers:
            raise ValueError(f"expected router logits for {self.num_layers} layers, got {len(layer_logits)}")
        tokens = layer_logits[0].shape[0]
        if tokens == 0:
            return
        previous_onehot = previous_top1 = None
        for layer, logits in enumerate(layer_logits):
            probs = torch.softmax(logits.float(), dim=-1)
            bad = torch.isnan(probs).any(dim=-1)
            if bad.any():
                raise NonFiniteRouting(layer, int(bad.sum()), tokens)
            top_idx = torch.topk(probs, self.top_k, dim=-1).indices  # sorted: column 0 is the top-1
            onehot = torch.zeros_like(probs, dtype=torch.float64).scatter_(1, top_idx, 1.0)
            top1 = top_idx[:, 0]
            self.counts[layer] += _np(onehot.sum(0)).astype(np.int64)
            self.top1_counts[layer] += _np(torch.bincount(top1, minlength=self.num_experts))
            self.coselection[layer] += _np(onehot.T @ onehot).astype(np.int64)
            self.prob_sums[layer] += _np(probs.double().sum(0))
            self.entropy_bits_sums[layer] -= float(torch.special.xlogy(probs, probs).double().sum()) / _LN2
            self.top1_prob_sums[layer] += float(probs.max(dim=-1).values.double().sum())
            if previous_onehot is not None:
                self.adjacent_top1_agree[layer - 1] += int((previous_top1 == top1).sum())
                self.adjacent_topk_shared[layer - 1] += int((previous_onehot * onehot).sum())
            previous_onehot, previous_top1 = onehot, top1
            if label is not None:
                per_label = self.label_counts.setdefault(label, np.zeros_like(self.counts))
                per_label[layer] += _np(onehot.sum(0)).astype(np.int64)
        self.tokens += tokens
        if label is not None:
            self.label_tokens[label] = self.label_tokens.get(label, 0) + tokens


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()
