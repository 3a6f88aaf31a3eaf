"""ram and ramplus_tl (Reinforced Agent Merging), with mergekit 0.1.5's numbers.

Each task vector δᵢ = mᵢ − base keeps the elements with |δᵢ| > epsilon. An element kept by one model only is
added as is; one kept by several is averaged over them. ramplus_tl scales each model's unique elements by
1 + r·clamp(ρᵢ, 0, alpha), with ρᵢ = (its elements shared with others) / (its unique elements), counted over the
whole tensor. The torch calls are mergekit's, in its order, so the dtypes and roundings are its too (ramplus_tl's
scale is an fp32 tensor, which lifts half-precision task vectors to fp32 before the sum).
"""

from __future__ import annotations

import torch

from moekit.merging.registry import Param, merge_method, non_negative

Tensors = list[torch.Tensor]
EPSILON = Param("epsilon", float, default=1e-5, check=non_negative, help="|δ| at or below this counts as 0")


def _kept(tensors: Tensors, base: torch.Tensor, epsilon: float):
    """(flat task vectors with the dropped elements zeroed, kept mask, models keeping each element)."""
    flat = torch.stack([m - base for m in tensors]).view(len(tensors), -1)
    kept = flat.abs() > epsilon
    counts = kept.sum(dim=0, keepdim=True)
    return flat * kept, kept, counts


@merge_method("ram", base="required", params=[EPSILON], elementwise=True)
def ram(tensors: Tensors, base: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    """base + Σᵢ δᵢ where one model moved the element, the mean of the movers' δ where several did."""
    z, kept, counts = _kept(tensors, base, epsilon)
    merged = (z * (counts == 1) + z * (counts > 1) / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@merge_method(
    "ramplus_tl",
    base="required",
    params=[
        Param("r", float, default=0.1, help="strength of the unique-element boost"),
        Param("alpha", float, default=0.2, check=non_negative, help="cap on the shared/unique ratio"),
        EPSILON,
    ],
    returns_float32=True,
)
def ramplus_tl(
    tensors: Tensors, base: torch.Tensor, *, r: float, alpha: float, epsilon: float
) -> torch.Tensor:
    """ram with each model's unique elements scaled by 1 + r·clamp(shared/unique, 0, alpha) (per tensor)."""
    z, kept, counts = _kept(tensors, base, epsilon)
    overlap, unique = counts > 1, counts == 1
    rho = (kept & overlap).sum(dim=1) / (kept & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    merged = (z * unique * boost.unsqueeze(-1) + z * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)
