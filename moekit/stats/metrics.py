"""Routing metrics as pure functions of accumulated counts (numpy in, numpy out).

Shapes: L = MoE layers, E = experts, k = experts per token, T = non-padding tokens seen by each layer.
Every "assignment" is one (token, top-k slot) pair, so a layer makes k*T assignments.

Definitions (the JSON and the docs use these names):

* fraction[l, e]       = count[l, e] / (k*T): the share of layer l's assignments that went to e (sums to 1).
* max_over_mean[l]     = max_e count / mean_e count (1 = perfectly balanced, E/k = all on the same k experts).
* cv[l]                = population std_e(count) / mean_e(count).
* switch_aux[l]        = E * sum_e fraction[l, e] * P[l, e], with P the router softmax probability averaged
                         over tokens. 1 at perfect balance for any k; transformers' `load_balancing_loss_func`
                         (before `router_aux_loss_coef`) is k times this value for a single layer.
* entropy_bits[l]      = mean over tokens of the entropy of the full softmax over E experts, in bits.
* top1_prob[l]         = mean over tokens of the largest softmax probability.
* dead[l, e]           = fraction[l, e] < 0.01 / E, i.e. below 1% of a uniform share.
* coselection[l, a, b] = tokens whose top-k at layer l holds both a and b (a != b); the diagonal holds count.
* top1_agreement[i]    = share of tokens whose top-1 expert index is the same in MoE layers i and i+1 (the
                         layers as listed, i.e. consecutive MoE layers). Expert indices mean the same thing
                         across layers in clown-MoEs and upcycled models, which is where this is informative.
  top1_chance[i]       = sum_e p1[i, e] * p1[i+1, e], the agreement expected if the two layers chose
                         independently with their observed top-1 marginals p1.
  topk_overlap[i]      = mean over tokens of |topk_i ∩ topk_{i+1}| / k.
* Specialisation, per layer, from the label x expert table of assignments J[y, e] (each token contributes k
  assignments to its label's row): mutual information I(label; expert) in bits; normalised by
  min(H(label), H(expert)), its upper bound, so 1 means one determines the other and 0 independence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

DEAD_SHARE = 0.01  # an expert is dead below this share of a uniform load

# One line per reported name, copied into every JSON report so the numbers explain themselves.
DEFINITIONS = {
    "counts": "top-k assignments per expert (each token makes k); a layer's counts sum to k*tokens",
    "fractions": "counts / (k*tokens)",
    "top1_counts": "tokens whose highest-probability expert is this one",
    "mean_router_prob": "router softmax probability averaged over tokens",
    "max_over_mean": "max over experts of counts / their mean (1 = even)",
    "cv": "population std / mean of counts over experts (0 = even)",
    "switch_aux": "E * sum_e fraction_e * mean_router_prob_e (1 = even; transformers' Mixtral aux loss is k times it)",
    "entropy_bits": "mean over tokens of the router softmax entropy, bits",
    "top1_prob": "mean over tokens of the largest router probability",
    "dead_experts": "experts whose fraction is below 1% of 1/E",
    "coselection": "tokens that hold both experts in their top-k; diagonal = counts",
    "top1_agreement": "share of tokens with the same top-1 expert index in this MoE layer and the next one",
    "top1_chance": "top1_agreement expected if the two layers chose independently (sum_e p1_l(e) p1_l+1(e))",
    "topk_overlap": "mean over tokens of |top-k here ∩ top-k in the next MoE layer| / k",
    "mutual_information_bits": "I(label; expert) over top-k assignments, bits",
    "mutual_information_normalised": "I(label; expert) / min(H(label), H(expert))",
    "overall": "means over MoE layers, except counts/fractions/coselection, which are summed over layers",
}


def fractions(counts: np.ndarray, top_k: int, tokens: int) -> np.ndarray:
    """counts / (k*T): each row sums to 1."""
    return counts / float(top_k * tokens)


def max_over_mean(counts: np.ndarray) -> np.ndarray:
    """max/mean of the counts along the last (expert) axis."""
    return counts.max(axis=-1) / counts.mean(axis=-1)


def coefficient_of_variation(counts: np.ndarray) -> np.ndarray:
    """Population standard deviation over mean, along the expert axis."""
    return counts.std(axis=-1) / counts.mean(axis=-1)


def switch_aux(fraction: np.ndarray, mean_probs: np.ndarray) -> np.ndarray:
    """E * sum_e f_e * P_e per layer (Switch Transformer load-balancing loss, k-normalised)."""
    return fraction.shape[-1] * (fraction * mean_probs).sum(axis=-1)


def dead_experts(fraction: np.ndarray) -> np.ndarray:
    """Boolean mask of experts whose share is below DEAD_SHARE of the uniform share 1/E."""
    return fraction < DEAD_SHARE / fraction.shape[-1]


def chance_agreement(top1_counts: np.ndarray, tokens: int) -> np.ndarray:
    """[L-1]: top-1 agreement of consecutive layers expected if they chose independently."""
    p = top1_counts / float(tokens)
    return (p[:-1] * p[1:]).sum(axis=-1)


def entropy_bits(p: np.ndarray) -> float:
    """Shannon entropy in bits of a probability vector (zeros contribute 0)."""
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def mutual_information_bits(joint_counts: np.ndarray) -> tuple[float, float]:
    """(I(Y;E) in bits, I normalised by min(H(Y), H(E))) for a Y x E table of counts."""
    joint = joint_counts / joint_counts.sum()
    p_y = joint.sum(axis=1, keepdims=True)
    p_e = joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    mi = float((joint[nz] * np.log2(joint[nz] / (p_y @ p_e)[nz])).sum())
    bound = min(entropy_bits(p_y.ravel()), entropy_bits(p_e.ravel()))
    mi = max(mi, 0.0)  # rounding can leave -1e-17 for independent tables
    return mi, (mi / bound if bound > 0 else 0.0)


@dataclass(frozen=True)
class Specialisation:
    """How strongly the routing depends on the prompt label.

    `distribution[label]` is the label's share of assignments per expert pooled over all MoE layers (sums to 1);
    `top_expert[label]` its argmax and `top_share[label]` the share there; `top_expert_per_layer[label]` the
    argmax per layer. `mi_bits`/`mi_normalised` are per layer; `mean_mi_bits`/`mean_mi_normalised` their mean.
    """

    labels: tuple[str, ...]
    distribution: dict[str, np.ndarray]
    top_expert: dict[str, int]
    top_share: dict[str, float]
    top_expert_per_layer: dict[str, np.ndarray]
    mi_bits: np.ndarray
    mi_normalised: np.ndarray

    @property
    def mean_mi_bits(self) -> float:
        return float(self.mi_bits.mean())

    @property
    def mean_mi_normalised(self) -> float:
        return float(self.mi_normalised.mean())


def specialisation(label_counts: Mapping[str, np.ndarray]) -> Specialisation:
    """Specialisation report from per-label [L, E] assignment counts (see the module docstring)."""
    labels = tuple(label_counts)
    stacked = np.stack([np.asarray(label_counts[y], dtype=np.float64) for y in labels])  # [Y, L, E]
    pooled = stacked.sum(axis=1)  # [Y, E]
    distribution = {y: pooled[i] / pooled[i].sum() for i, y in enumerate(labels)}
    per_layer = [mutual_information_bits(stacked[:, layer, :]) for layer in range(stacked.shape[1])]
    return Specialisation(
        labels=labels,
        distribution=distribution,
        top_expert={y: int(distribution[y].argmax()) for y in labels},
        top_share={y: float(distribution[y].max()) for y in labels},
        top_expert_per_layer={y: stacked[i].argmax(axis=-1) for i, y in enumerate(labels)},
        mi_bits=np.array([mi for mi, _ in per_layer]),
        mi_normalised=np.array([nmi for _, nmi in per_layer]),
    )
