"""Sparsifiers for task vectors: which elements of a delta survive, and by how much the survivors are rescaled.

Each sparsifier returns a `Sparsified` recipe (a keep mask and a rescale factor) rather than the sparse tensor,
so a caller that must visit the deltas twice (the TIES sign vote, then the agreeing sum) can keep one byte per
element instead of a second fp32 copy, and rebuild the identical sparse delta by applying the recipe again.

The numbers are mergekit 0.1.5's (`mergekit/sparsify.py`):
- magnitude (TIES): keep exactly k = max(1, int(density·numel)) largest |δ| over the whole tensor.
- magnitude_outliers (breadcrumbs): drop the int(gamma·numel) largest, keep the next int(density·numel).
- bernoulli (DARE): keep each element with probability `density`, drawn by `torch.bernoulli` on a tensor filled
  with `density`, in fp32 (bf16 when the compute dtype is bf16), exactly as mergekit draws it.
- della_magprune (DELLA): keep probability per row, linear in the element's magnitude rank within its row, from
  density − ε (smallest) to density + ε (largest).
The rescale (when on) makes the sparse delta's L1 norm equal the dense one's (mergekit's `RescaleNorm.l1`); l2 and
linf are mergekit's other norms; `inverse_density` divides each survivor by its keep probability (the DARE and
DELLA papers' 1/(1−p)).

Top-k selection uses `torch.kthvalue` plus a tie fix, never a full sort. Ties at the threshold are broken by
lower flat index first; mergekit's unstable argsort breaks them arbitrarily, so on tensors with many equal
magnitudes at the threshold (bf16 deltas) the chosen elements can differ there while the kept count is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RESCALE_NORMS = ("l1", "l2", "linf", "inverse_density")


@dataclass
class Sparsified:
    """How to turn a dense delta into its sparse version: `delta * keep * factor` (either may be None)."""

    keep: torch.Tensor | None  # bool, same shape as the delta; None keeps everything
    factor: torch.Tensor | float | None  # scalar or per-element multiplier for the survivors
    masked: torch.Tensor | None = (
        None  # delta·keep, already computed to measure its norm: used by the first apply
    )

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        """The sparse delta (bit-identical every time it is applied to the same delta). It may be `delta` itself,
        so callers pass a delta they own."""
        if self.masked is not None:
            out, self.masked = self.masked, None
        else:
            out = delta if self.keep is None else delta.mul_(self.keep)
        return out if self.factor is None else out.mul_(self.factor)


KEEP_ALL = Sparsified(None, None)


def _rescale(
    delta: torch.Tensor, keep: torch.Tensor, norm: str | None, keep_prob=None, eps: float = 1e-7
) -> Sparsified:
    """The survivors' multiplier: the norm ratio dense/sparse (1 when either norm is below eps), as mergekit."""
    if norm is None:
        return Sparsified(keep, None)
    if norm == "inverse_density":
        return Sparsified(keep, 1.0 / keep_prob if isinstance(keep_prob, float) else keep_prob.reciprocal())
    masked = delta * keep
    if norm == "l1":
        before, after = delta.abs().sum(), masked.abs().sum()
    elif norm == "l2":
        before, after = delta.norm(), masked.norm()
    else:
        before, after = delta.abs().max(), masked.abs().max()
    if before < eps or after < eps:
        return Sparsified(keep, None, masked)
    return Sparsified(keep, before / after, masked)


SAMPLE = 1 << 16  # elements sampled (by stride) to bracket an order statistic before the exact selection


def kth_smallest(values: torch.Tensor, r: int) -> torch.Tensor:
    """The r-th smallest entry (1-based) of a flat tensor, exactly.

    A strided sample brackets the answer; only the entries inside the bracket (a few percent) go to `kthvalue`,
    which copies and partitions its input and dominates the cost on the whole tensor. When the bracket misses
    (the sample was unrepresentative), the whole tensor is used: the answer is exact either way.
    """
    n = values.numel()
    if n > 8 * SAMPLE:
        sample = values[:: n // SAMPLE].sort().values
        m = sample.numel()
        margin = 4 * int(m**0.5) + 8  # ~8 standard deviations of the sample rank
        at = (r - 1) * m // n
        lo, hi = sample[max(0, at - margin)], sample[min(m - 1, at + margin)]
        below = int(torch.count_nonzero(values < lo))
        inside = values[(values >= lo) & (values <= hi)]
        if below < r <= below + inside.numel():
            return torch.kthvalue(inside, r - below).values
    return torch.kthvalue(values, r).values


def rank_below(values: torch.Tensor, r: int) -> torch.Tensor:
    """Bool mask of the r smallest entries of a flat tensor (ties broken by lower index first)."""
    n = values.numel()
    if r <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if r >= n:
        return torch.ones(n, dtype=torch.bool)
    threshold = kth_smallest(values, r)
    mask = values < threshold
    missing = r - int(torch.count_nonzero(mask))
    if missing > 0:  # take `missing` of the entries equal to the threshold, lowest index first
        ties = (values == threshold).nonzero().squeeze(1)[:missing]
        mask[ties] = True
    return mask


def rank_above(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest entries of a flat tensor (ties broken by lower index first)."""
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    threshold = kth_smallest(values, n - k + 1)
    mask = values > threshold
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0:
        ties = (values == threshold).nonzero().squeeze(1)[:missing]
        mask[ties] = True
    return mask


def magnitude(delta: torch.Tensor, density: float, rescale_norm: str | None) -> Sparsified:
    """TIES trimming: keep the top max(1, int(density·numel)) by |δ| over the whole tensor."""
    if density >= 1:
        return KEEP_ALL
    k = max(1, int(density * delta.numel()))
    keep = rank_above(delta.abs().reshape(-1).float(), k).reshape(delta.shape)
    return _rescale(delta, keep, rescale_norm, density)


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float, rescale_norm: str | None
) -> Sparsified:
    """Breadcrumbs: drop the int(gamma·numel) largest |δ| and keep the next int(density·numel) below them.

    In ascending order of |δ| the kept ranks are [n_bot, n_bot + target) with n_bot = max(0, n − target − n_top),
    which shrinks the outlier cut when density + gamma > 1, as mergekit does.
    """
    if density >= 1:
        return KEEP_ALL
    n = delta.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    w = delta.abs().reshape(-1).float()
    keep = rank_below(w, n_bot + target)
    keep &= ~rank_below(w, n_bot)
    return _rescale(delta, keep.reshape(delta.shape), rescale_norm, density)


def work_dtype(delta: torch.Tensor) -> torch.dtype:
    # mergekit draws its masks in bf16 when the tensor is bf16 and in fp32 otherwise (torch.bernoulli has no fp16
    # on CPU). The bf16 draw is the fp32 draw with p rounded to bf16, so matching it matters for bit-equal masks.
    return torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32


def draw(probs: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Bool keep mask, one Bernoulli draw per element. Drawing straight into a bool tensor consumes the generator
    exactly as mergekit's `torch.bernoulli(probs)` does (same draws, same order), without its float output."""
    return torch.empty(probs.shape, dtype=torch.bool).bernoulli_(probs, generator=rng)


def bernoulli(
    delta: torch.Tensor, density: float, rescale_norm: str | None, rng: torch.Generator
) -> Sparsified:
    """DARE: keep each element independently with probability `density` (one draw per element, row-major)."""
    if density >= 1:
        return KEEP_ALL
    probs = torch.full(delta.shape, density, dtype=work_dtype(delta))
    keep = draw(probs, rng)
    del probs
    return _rescale(delta.to(work_dtype(delta)), keep, rescale_norm, density)


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, rescale_norm: str | None, rng: torch.Generator
) -> Sparsified:
    """DELLA MagPrune: per row, keep probability rises linearly with |δ|'s rank, from density−ε to density+ε.

    1-D tensors are one row. The probabilities are computed with mergekit's arithmetic, in the same order, so the
    Bernoulli draws see bit-identical thresholds.
    """
    if density >= 1:
        return KEEP_ALL
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della needs density ± epsilon inside (0, 1), got density {density} and epsilon {epsilon}"
        )
    dtype = work_dtype(delta)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    order = torch.argsort(rows.abs(), dim=1)
    # Inverse permutation of the sort, i.e. the 1-based ascending rank of each element (no second argsort).
    ranks = torch.empty_like(order)
    positions = torch.arange(1, rows.shape[1] + 1).view(1, -1, *([1] * (rows.dim() - 2))).expand_as(order)
    ranks.scatter_(1, order, positions)
    del order, positions
    ranks = ranks.to(dtype)
    # Each row's ranks are a permutation of 1..cols, so its min and max are known; mergekit reduces for them
    # (slow on CPU for short rows). Same-shaped tensors keep the arithmetic, and so the bits, identical.
    lo = torch.ones((*ranks.shape[:1], 1, *ranks.shape[2:]), dtype=dtype)
    hi = torch.full_like(lo, ranks.shape[1])
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    del ranks
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    del rank_norm
    keep = draw(probs, rng).reshape(delta.shape)
    return _rescale(delta.to(dtype), keep, rescale_norm, probs.reshape(delta.shape).float())
