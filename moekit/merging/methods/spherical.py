"""Interpolation on the sphere: slerp, nuslerp, multislerp and karcher, with mergekit 0.1.5's numbers.

- slerp: two models, the base at t = 0. The angle is taken over the whole flattened tensor (norms and the dot
  product accumulated in chunks of 2^20 elements, as mergekit does), falling back to linear interpolation when
  |cos θ| > 0.9995. The coefficients apply to the raw (not normalised) tensors, so norms interpolate too.
- nuslerp: two models; t = w₂ / (w₁ + w₂). Without a base it interpolates the models; with one it interpolates
  their task vectors. By default over the flattened tensor; `nuslerp_flatten: false` works per row (last dim) or,
  with `nuslerp_row_wise: true`, per column (dim 0).
- multislerp: any number of models, a barycentric mean on the sphere via the tangent space at the weighted
  mean of the unit vectors, rescaled to the weighted mean of the norms.
- karcher: the weighted (uniform) Riemannian mean on the unit sphere by fixed-point iteration, rescaled by the
  mean norm.
All compute in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch

from moekit.merging.registry import Param, in_range, merge_method, non_negative, positive

Tensors = list[torch.Tensor]
CHUNK = (
    1024 * 1024
)  # mergekit's slerp accumulates its norms and dot product over chunks of this many elements


def _chunks(x: torch.Tensor):
    for start in range(0, x.numel(), CHUNK):
        yield x[start : start + CHUNK]


def slerp_tensors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
):
    """Spherical interpolation from v0 (t = 0) to v1 (t = 1) over the flattened tensors.

    As mergekit, in fp32 for half-precision inputs (the 0.9995 threshold is 1.0 in bf16, so identical bf16
    tensors would take the sine branch and divide by zero) and rounded back to the inputs' dtype once."""
    if v0.dtype in (torch.bfloat16, torch.float16):
        return slerp_tensors(t, v0.float(), v1.float(), dot_threshold, eps).to(v0.dtype)
    a, b = v0.reshape(-1), v1.reshape(-1)
    if a.numel() == 0:
        return v0.clone()
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in _chunks(a)]))
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(y) for y in _chunks(b)]))
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((x / norm_a) * (y / norm_b)).sum() for x, y in zip(_chunks(a), _chunks(b))]).sum()
    dot = dot.clamp(-1, 1)
    t_ = torch.tensor(t, dtype=a.dtype)  # mergekit computes 1 - t in the compute dtype
    if dot.abs() > dot_threshold:
        coef_a, coef_b = 1 - t_, t_
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t_) * theta) / sin_theta
        coef_b = torch.sin(t_ * theta) / sin_theta
    # In place: the engine's inputs are ours to overwrite, and the big tensors then need no temporaries.
    return v0.mul_(coef_a).add_(v1.mul_(coef_b))


@merge_method(
    "slerp",
    base="required",
    params=[
        Param("t", float, check=in_range(0, 1), help="interpolation factor: 0 is the base, 1 the other model")
    ],
    min_models=1,
    max_models=1,
)
def slerp(tensors: Tensors, base: torch.Tensor, *, t: float) -> torch.Tensor:
    """Spherical interpolation between the base (t = 0) and the one other model (t = 1)."""
    return slerp_tensors(t, base, tensors[0])


def nuslerp_tensors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = False, eps=1e-8
):
    """Slerp along `dim` (or over the flattened tensor) with a per-vector linear fallback for (anti)parallel pairs."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos_theta = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


@merge_method(
    "nuslerp",
    base="optional",
    params=[
        Param("weight", float, per_model=True, help="relative weight of each of the two models"),
        Param("nuslerp_flatten", bool, default=True, help="interpolate the whole tensor as one vector"),
        Param(
            "nuslerp_row_wise", bool, default=False, help="without flatten: vectors along dim 0 instead of -1"
        ),
    ],
    min_models=2,
    max_models=2,
)
def nuslerp(tensors: Tensors, base, *, weight, nuslerp_flatten, nuslerp_row_wise) -> torch.Tensor:
    """Slerp of two models (or of their task vectors, given a base) at t = w₂ / (w₁ + w₂)."""
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    dim = 0 if nuslerp_row_wise else -1
    if base is None:
        return nuslerp_tensors(t, tensors[0], tensors[1], dim=dim, flatten=nuslerp_flatten)
    merged = nuslerp_tensors(t, tensors[0] - base, tensors[1] - base, dim=dim, flatten=nuslerp_flatten)
    return merged.add_(base)


@merge_method(
    "multislerp",
    base="optional",
    params=[
        Param("weight", float, per_model=True, help="weight of each model"),
        Param("normalize_weights", bool, default=True, help="divide the weights by their sum"),
        Param("eps", float, default=1e-8, check=positive, help="guards divisions by small norms"),
    ],
    # with one model the weights are never used; with more, a zero sum makes every weight infinite
    check_tensor=lambda p: (
        "the weights sum to 0, so they cannot be normalised; change a weight or set normalize_weights: false"
        if p["normalize_weights"] and len(p["weight"]) > 1 and sum(p["weight"]) == 0
        else None
    ),
)
def multislerp(
    tensors: Tensors, base, *, weight, normalize_weights, eps, mergekit_order: bool = False
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (of the task vectors when a base is given).

    The unit vectors are recomputed from the inputs on each pass instead of being stacked, so the extra memory is
    a few tensors of one input's size whatever the number of models. `mergekit_order` (compute_dtype: mergekit)
    stacks them and reduces over the stack as mergekit does, for its bits.
    """
    if len(tensors) == 1:
        return tensors[0]  # mergekit returns the single model as is, even with a base
    w = torch.tensor(weight, dtype=tensors[0].dtype)
    if normalize_weights:
        w = w / w.sum()
    if mergekit_order:
        return _multislerp_stacked(tensors, base, w, eps)

    def vector(i):
        return (tensors[i] - base if base is not None else tensors[i]).reshape(-1)

    norms = [torch.norm(vector(i)) for i in range(len(tensors))]

    def unit(i):
        return vector(i).div_(norms[i] + eps) if base is not None else vector(i) / (norms[i] + eps)

    mean = sum((unit(i) * w[i] for i in range(len(tensors))), torch.zeros(()))
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:  # antipodal pair: linear interpolation, as mergekit
            out = (vector(0) * w[0] + vector(1) * w[1]).view(tensors[0].shape)
            return out + base if base is not None else out
        raise ValueError(
            "the weighted sum of the unit task vectors is zero (antipodal inputs with balancing weights); "
            "change the weights"
        )
    mean = mean / mean_norm
    tangent = None
    for i in range(len(tensors)):
        u = unit(i)
        step = (u - (u * mean).sum() * mean) * w[i]
        tangent = step if tangent is None else tangent.add_(step)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = result * (torch.stack(norms) * w).sum()
    result = result.view(tensors[0].shape)
    return result + base if base is not None else result


def _multislerp_stacked(tensors: Tensors, base, w: torch.Tensor, eps: float) -> torch.Tensor:
    stack = torch.stack(tensors)
    if base is not None:
        stack -= base
    flat = stack.view(stack.shape[0], -1)
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            out = (stack[0] * w[0] + stack[1] * w[1]).view(stack.shape[1:])
            return out + base if base is not None else out
        raise ValueError(
            "the weighted sum of the unit task vectors is zero (antipodal inputs with balancing weights); "
            "change the weights"
        )
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).view(stack.shape[1:])
    return result + base if base is not None else result


def karcher_mean(tensors: Tensors, alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """Weighted Karcher mean of the tensors' directions, scaled by the weighted mean of their norms.

    Norms are taken in fp32 (fp64 for fp64 inputs) and every iterate is rounded back to the inputs' dtype, as
    mergekit does: the same numbers for half-precision inputs too."""
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    dtype = tensors[0].dtype
    norms = [torch.linalg.vector_norm(x.to(acc)) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha_sum = sum(alphas[i] for i in valid)
    a = [alphas[i] / alpha_sum for i in valid]
    u = [units[i] for i in valid]

    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        mean += ai * ui
    mean_norm = torch.linalg.vector_norm(mean.to(acc))
    mean = u[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            dot = torch.clamp(torch.dot(mean.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (ui - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(acc))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(acc))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(dtype)
    return sum(ai * n for ai, n in zip(alphas, norms)) * mean


@merge_method(
    "karcher",
    params=[
        Param("max_iter", int, default=10, check=non_negative, help="fixed-point iterations at most"),
        Param("tol", float, default=1e-5, check=positive, help="stop when the tangent step is below this"),
    ],
)
def karcher(tensors: Tensors, base, *, max_iter: int, tol: float) -> torch.Tensor:
    """Uniformly weighted Karcher (Riemannian) mean of the models on the unit sphere, times their mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    return karcher_mean(tensors, [1.0 / len(tensors)] * len(tensors), max_iter, tol)
