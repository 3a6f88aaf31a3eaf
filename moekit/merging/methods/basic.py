"""linear, task_arithmetic and passthrough: the methods with no sparsification."""

from __future__ import annotations

import math

import torch

from moekit.merging.methods.task_vectors import merge_task_vectors
from moekit.merging.registry import Param, merge_method

Tensors = list[torch.Tensor]


def weights_cancel(weight: list[float]) -> str | None:
    if sum(weight) == 0:
        return "the weights sum to 0, so they cannot be normalised; change a weight or set normalize: false"
    return None


@merge_method(
    "linear",
    params=[
        Param("weight", float, per_model=True, help="weight of each model"),
        Param("normalize", bool, default=True, help="divide by the sum of the weights"),
    ],
    elementwise=True,
    check_tensor=lambda params: weights_cancel(params["weight"]) if params["normalize"] else None,
)
def linear(tensors: Tensors, base, *, weight: list[float], normalize: bool) -> torch.Tensor:
    """Weighted average Σwᵢmᵢ / Σwᵢ (or the plain weighted sum with normalize: false).

    As mergekit: in fp32 (fp64 for fp64 inputs) whatever the inputs' dtype, each term added by addcmul into a
    zero-initialised sum, divided by the fp32 sum of the weights, and rounded back to the inputs' dtype once."""
    first = tensors[0]
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    if normalize:
        if problem := weights_cancel(weight):
            raise ValueError(problem)
        # Scale the weights (and so their sum) by a power of two so that the largest is in [0.5, 1): exact, so the
        # result keeps its bits, but tiny weights (1e-44) no longer make wᵢ·mᵢ float32 subnormals, which hold
        # only a few significant bits.
        shift = -math.frexp(max(abs(w) for w in weight))[1]
        weight = [math.ldexp(w, shift) for w in weight]
    weights = torch.tensor(weight, dtype=acc)
    out = torch.zeros_like(first, dtype=acc)
    for x, w in zip(tensors, weights):
        out.addcmul_(x, w)
    if normalize:
        out.div_(weights.sum())
    return out.to(first.dtype)


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
    tensors: Tensors,
    base: torch.Tensor,
    *,
    weight: list[float],
    lambda_: float,
    normalize: bool,
    mergekit_order: bool = False,
):
    """base + λ·Σwᵢ(mᵢ − base): mergekit's generalised task arithmetic with no sparsification, in its order."""
    return merge_task_vectors(
        tensors, base, weight, lambda delta, i: delta, None, normalize, lambda_, mergekit_order
    )


@merge_method(
    "passthrough",
    params=[Param("scale", float, default=1.0, per_model=True, help="multiply the tensor")],
    max_models=1,
    elementwise=True,
)
def passthrough(tensors: Tensors, base, *, scale: list[float]) -> torch.Tensor:
    """Copies the one input tensor, optionally scaled (frankenmerges stack layers with `slices`)."""
    return tensors[0] if scale[0] == 1.0 else tensors[0] * scale[0]
