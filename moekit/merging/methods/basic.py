"""linear, task_arithmetic and passthrough: the methods with no sparsification."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from moekit.merging.registry import Param, merge_method

Tensors = list[torch.Tensor]


def weighted_sum(tensors: Iterable[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ wᵢ·xᵢ, accumulated in place; given a generator, only one temporary lives at a time."""
    out = None
    for x, w in zip(tensors, weights):
        out = x * w if out is None else out.add_(x, alpha=w)
    return out


def safe_divisor(total: float, eps: float = 1e-8) -> float:
    # mergekit divides by 1 where the weights cancel, instead of producing inf.
    return 1.0 if abs(total) < eps else total


@merge_method(
    "linear",
    params=[
        Param("weight", float, per_model=True, help="weight of each model"),
        Param("normalize", bool, default=True, help="divide by the sum of the weights"),
    ],
    elementwise=True,
)
def linear(tensors: Tensors, base, *, weight: list[float], normalize: bool) -> torch.Tensor:
    """Weighted average Σwᵢmᵢ / Σwᵢ (or the plain weighted sum with normalize: false)."""
    total = sum(weight)
    if normalize:
        if total == 0:
            raise ValueError(
                "the weights sum to 0, so they cannot be normalised; change a weight or set normalize: false"
            )
        # Scale the weights (and their sum) by a power of two so that the largest is in [0.5, 1): exact, so the
        # result keeps its bits, but tiny weights (1e-44) no longer make wᵢ·mᵢ float32 subnormals, which hold
        # only a few significant bits.
        shift = -math.frexp(max(abs(w) for w in weight))[1]
        weight, total = [math.ldexp(w, shift) for w in weight], math.ldexp(total, shift)
    out = weighted_sum(tensors, weight)
    if normalize:
        out.div_(total)
    return out


@merge_method(
    "task_arithmetic",
    base="required",
    params=[
        Param("weight", float, per_model=True, help="weight of each task vector"),
        Param("lambda", float, default=1.0, help="scale applied to the summed task vectors"),
        Param("normalize", bool, default=False, help="divide by the sum of the weights"),
    ],
    elementwise=True,
)
def task_arithmetic(
    tensors: Tensors, base: torch.Tensor, *, weight: list[float], lambda_: float, normalize: bool
):
    """base + λ·Σwᵢ(mᵢ − base)."""
    delta = weighted_sum((m - base for m in tensors), weight)
    if normalize:
        delta.div_(safe_divisor(sum(weight)))
    return delta.mul_(lambda_).add_(base)


@merge_method(
    "passthrough",
    params=[Param("scale", float, default=1.0, per_model=True, help="multiply the tensor")],
    max_models=1,
    elementwise=True,
)
def passthrough(tensors: Tensors, base, *, scale: list[float]) -> torch.Tensor:
    """Copies the one input tensor, optionally scaled (frankenmerges stack layers with `slices`)."""
    return tensors[0] if scale[0] == 1.0 else tensors[0] * scale[0]
