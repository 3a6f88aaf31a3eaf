"""Per-element selection between the base and one fine-tune: nearswap and arcee_fusion (mergekit 0.1.5's numbers).

- nearswap: weight = clamp(t / max(|base − model|, 1e-6), 0, 1) per element, result = weight·model +
  (1 − weight)·base: elements where the two are within t of each other move fully to the model.
- arcee_fusion: importance = |model − base| · KL(softmax(model) ‖ softmax(base)) along the last dim; elements whose
  importance reaches median + 1.5·IQR take the model's value, the rest keep the base. The quantiles come from a
  sort of the importances, or, above 10⁶ elements, of 10⁶ samples drawn with replacement from the run's
  generator (one `torch.randint` call, as mergekit draws it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.merging.registry import Param, merge_method, non_negative

Tensors = list[torch.Tensor]
QUANTILE_SAMPLE_SIZE = 1_000_000


@merge_method(
    "nearswap",
    base="required",
    params=[
        Param(
            "t", float, check=non_negative, help="distance below which the model's value replaces the base's"
        )
    ],
    min_models=1,
    max_models=1,
    elementwise=True,
)
def nearswap(tensors: Tensors, base: torch.Tensor, *, t: float) -> torch.Tensor:
    """Take the model's value where it is near the base's, interpolating by t / |difference| elsewhere."""
    model = tensors[0]
    weight = (t / (base - model).abs_().clamp_(min=1e-6)).clamp_(0, 1)
    return (weight * model).add_((1 - weight).mul_(base))


def approximate_quantiles(values: torch.Tensor, q: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE_SIZE,), generator=rng)]
    ordered = torch.sort(flat).values
    return ordered[(q * (ordered.numel() - 1)).long()]


@merge_method("arcee_fusion", base="required", min_models=1, max_models=1, random=True, returns_float32=True)
def arcee_fusion(tensors: Tensors, base: torch.Tensor, *, rng: torch.Generator) -> torch.Tensor:
    """Keep the base except where the fine-tune's change is important (above median + 1.5·IQR).

    The mask is fp32, as mergekit's: half-precision inputs give base + (model − base) summed in fp32, which
    mergekit writes unrounded."""
    model = tensors[0]
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    del p, q
    importance = (model - base).abs() * kl
    q1, median, q3 = approximate_quantiles(importance, torch.tensor([0.25, 0.5, 0.75]), rng)
    fused = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (model - base) * fused
