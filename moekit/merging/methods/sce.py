"""sce (FuseChat, Wan et al., 2024): Select by variance, Calculate weights by energy, Erase by sign.

With mergekit 0.1.5's numbers:
1. Select: with select_topk < 1, keep the int(count_nonzero(var)·select_topk) elements whose variance across the
   task vectors is largest (the same elements for every model); the others become 0 in every task vector.
2. Calculate: each task vector's weight is its mean square, divided by the sum over models (uniform when the sum
   is below 1e-6).
3. Erase: the TIES sign vote on the (unweighted) selected task vectors; disagreeing elements are dropped.
4. base + Σ wᵢ·agreeᵢ·τᵢ / max(Σ wᵢ·agreeᵢ, 1e-6).
The task vectors are stacked ([n, *shape]) because the selection needs the variance across models. `int8_mask`
is accepted for mergekit configs and ignored.
"""

from __future__ import annotations

import torch

from moekit.merging.registry import Param, in_range, merge_method

Tensors = list[torch.Tensor]


def variance_topk_mask(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """Float mask of the top fraction (of the nonzero-variance count) of elements by variance across models."""
    var = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


@merge_method(
    "sce",
    base="required",
    params=[
        Param(
            "select_topk",
            float,
            default=1.0,
            check=in_range(0, 1, lo_open=True),
            help="fraction kept by variance",
        ),
        Param("int8_mask", bool, default=False, help="accepted for mergekit configs; ignored"),
    ],
)
def sce(tensors: Tensors, base: torch.Tensor, *, select_topk: float, int8_mask: bool) -> torch.Tensor:
    """Select high-variance elements, weight each task vector by its energy, erase sign conflicts, average."""
    task_vectors = torch.stack([m - base for m in tensors])
    if select_topk < 1:
        task_vectors.mul_(variance_topk_mask(task_vectors, select_topk))
    positive = task_vectors.sum(dim=0) >= 0
    agree = torch.where(positive, task_vectors > 0, task_vectors < 0)

    energy = task_vectors.square().reshape(len(tensors), -1).mean(dim=1)
    total = energy.sum().item()
    weights = torch.full_like(energy, 1 / len(tensors)) if abs(total) < 1e-6 else energy / total
    erased = weights.view(-1, *([1] * base.dim())) * agree
    del agree
    merged = (task_vectors.mul_(erased)).sum(dim=0)
    return merged.div_(erased.sum(dim=0).clamp(min=1e-6)).add_(base)
