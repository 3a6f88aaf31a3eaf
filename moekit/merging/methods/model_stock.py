"""model_stock (Jang et al., 2024): move from the base towards the average of the fine-tunes by a ratio set by
the angle between their task vectors, with mergekit 0.1.5's numbers.

t = N·cos θ / (1 + (N − 1)·cos θ), where cos θ is the mean pairwise cosine of the N task vectors (each clamped
to [−1, 1], norms clamped below at 1e-6), and the result is t·mean(models) + (1 − t)·base. Where the denominator
vanishes (|·| < 1e-6) the base is kept. `filter_wise: true` takes one angle per row instead of one per tensor.
mergekit counts the base among the inputs and needs at least 3 of them, i.e. the base and 2 models.
"""

from __future__ import annotations

import torch

from moekit.merging.registry import Param, merge_method

Tensors = list[torch.Tensor]


@merge_method(
    "model_stock",
    base="required",
    params=[
        Param("filter_wise", bool, default=False, help="one interpolation ratio per row, not per tensor")
    ],
    min_models=2,
)
def model_stock(tensors: Tensors, base: torch.Tensor, *, filter_wise: bool) -> torch.Tensor:
    """Interpolate between the base and the fine-tunes' average by the Model Stock ratio."""
    if filter_wise:
        rows = (lambda x: x.unsqueeze(0)) if base.dim() == 1 else (lambda x: x)
    else:
        rows = lambda x: x.reshape(-1)  # noqa: E731 - the flat view, one angle per tensor
    w0 = rows(base)
    offsets = [rows(m) - w0 for m in tensors]
    norms = [torch.norm(d, dim=-1) for d in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(tensors)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0, (n * cos_theta) / torch.where(singular, 1, denominator))
    average = sum(rows(m) for m in tensors) / n
    return (t * average + (1 - t) * w0).reshape(base.shape)
