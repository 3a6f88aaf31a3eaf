"""Sparsifiers for task vectors: which elements of a delta survive, and by how much the survivors are rescaled.

Each sparsifier spends the delta it is given (the caller owns it) and returns the sparse version, written over the
delta or over the keep mask it made, so a merge holds one tensor per model and no mask-sized float copies.

The numbers are mergekit 0.1.5's (`mergekit/sparsify.py`):
- magnitude (TIES): keep exactly k = max(1, int(density·numel)) largest |δ| over the whole tensor.
- magnitude_outliers (breadcrumbs): drop the int(gamma·numel) largest, keep the next int(density·numel).
- bernoulli (DARE): keep each element with probability `density` (in fp32, or bf16 when the compute dtype is
  bf16), with exactly the generator draws of mergekit's `torch.bernoulli(torch.full_like(delta, density))`.
- della_magprune (DELLA): keep probability per row, linear in the element's magnitude rank within its row, from
  density − ε (smallest) to density + ε (largest).
The rescale (when on) makes the sparse delta's L1 norm equal the dense one's (mergekit's `RescaleNorm.l1`); l2 and
linf are mergekit's other norms; `inverse_density` divides each survivor by its keep probability (the DARE and
DELLA papers' 1/(1−p)).

Top-k selection uses `torch.kthvalue`, not a full sort. Only when several entries equal the threshold and just
some of them are kept does the choice need mergekit's own rule: its (unstable, deterministic) full sort picks them,
so the kept set is mergekit's. That sort runs only for such tensors (quantised or half-precision deltas).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

RESCALE_NORMS = ("l1", "l2", "linf", "inverse_density")


def _sparse(delta: torch.Tensor, keep: torch.Tensor, norm: str | None, keep_prob=None, eps: float = 1e-7):
    """delta·keep, times the norm ratio dense/sparse (none when either norm is below eps), as mergekit.

    Both arguments are ours to overwrite: the result is written over one of them and the other is spent, so a
    sparsify allocates nothing tensor-sized. `keep` is a bool or 1.0/0.0 mask; a float mask in delta's dtype
    multiplies ~10× faster than a bool one, which takes a slow dtype-promoting path, and gives the same bits."""
    keep = keep.to(delta.dtype)
    if norm == "inverse_density":
        factor = 1.0 / keep_prob if isinstance(keep_prob, float) else keep_prob.reciprocal()
        return delta.mul_(keep).mul_(factor)
    if norm is None:
        return delta.mul_(keep)
    # The masked delta goes into the mask's buffer, leaving delta's free to hold the magnitudes that mergekit
    # sums (|δ|, then |δ·keep|): the same tensors summed the same way, so the factor has mergekit's bits.
    sparse = torch.mul(delta, keep, out=keep)
    if norm == "l1":
        before = delta.abs_().sum()
        after = torch.abs(sparse, out=delta).sum()
    else:
        measure = (lambda x: x.norm()) if norm == "l2" else (lambda x: x.abs().max())
        before, after = measure(delta), measure(sparse)
    del delta
    if before < eps or after < eps:
        return sparse
    return sparse.mul_(before / after)


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


def rank_below(values: torch.Tensor, r: int) -> torch.Tensor | None:
    """Bool mask of the r smallest entries of a flat tensor; None when entries equal at the r-th must be chosen
    among (the caller then sorts, as mergekit does)."""
    n = values.numel()
    if r <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if r >= n:
        return torch.ones(n, dtype=torch.bool)
    threshold = kth_smallest(values, r)
    mask = values < threshold
    missing = r - int(torch.count_nonzero(mask))
    if missing > 0:
        ties = values == threshold
        if missing < int(torch.count_nonzero(ties)):
            return None
        mask |= ties
    return mask


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor | None:
    """The k largest entries of a flat float tensor as a 1.0/0.0 mask, written over `values`; None (and
    `values` untouched) when entries equal at the threshold must be chosen among. A float mask multiplies a float
    tensor several times faster than a bool one."""
    n = values.numel()
    if k >= n:
        return values.fill_(1)
    threshold = kth_smallest(values, n - k + 1)
    ties = (values == threshold).nonzero().squeeze(1)
    missing = k - int(torch.count_nonzero(values > threshold))
    if 0 < missing < ties.numel():
        return None
    mask = values.gt_(threshold)
    mask[ties] = 1  # all of them are kept when any is
    return mask


def magnitude(
    delta: torch.Tensor, density: float, rescale_norm: str | None, by_sort: bool = False
) -> torch.Tensor:
    """TIES trimming: keep the top max(1, int(density·numel)) by |δ| over the whole tensor. Among equal
    magnitudes at the threshold mergekit's full descending argsort picks (always, with `by_sort`)."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    w = delta.abs().reshape(-1).float()
    keep = None if by_sort else top_k_mask(w, k)
    if keep is None:
        keep = torch.zeros(w.numel(), dtype=delta.dtype)
        keep[torch.argsort(w, descending=True)[:k]] = 1
    keep = keep.reshape(delta.shape)
    return _sparse(delta, keep, rescale_norm, density)


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float, rescale_norm: str | None, by_sort: bool = False
) -> torch.Tensor:
    """Breadcrumbs: drop the int(gamma·numel) largest |δ| and keep the next int(density·numel) below them.

    In ascending order of |δ| the kept ranks are [n_bot, n_bot + target) with n_bot = max(0, n − target − n_top),
    which shrinks the outlier cut when density + gamma > 1, as mergekit does.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    w = delta.abs().reshape(-1).float()
    upper = None if by_sort else rank_below(w, n_bot + target)
    lower = None if upper is None else rank_below(w, n_bot)
    if lower is None:  # mergekit's ascending sort decides among equal magnitudes at either bound
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.sort(w).indices[n_bot : n_bot + target]] = True
    else:
        keep = upper & ~lower
    return _sparse(delta, keep.reshape(delta.shape), rescale_norm, density)


def work_dtype(delta: torch.Tensor) -> torch.dtype:
    # mergekit draws its masks in bf16 when the tensor is bf16 and in fp32 otherwise (torch.bernoulli has no fp16
    # on CPU). The bf16 draw is the fp32 draw with p rounded to bf16, so matching it matters for bit-equal masks.
    return torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32


class Uniforms:
    """U[0, 1) fp32 draws taken from the run's generator ahead of time, handed out in the order they were drawn.

    torch's generator is a serial per-element loop (~6 ns an element here, a DARE merge's longest chain of work),
    so the engine draws on a thread of its own, ahead of the compute. The stream is the same as drawing at the
    point of use: draws happen in tensor order, models in config order."""

    def __init__(self, rng: torch.Generator, shapes: Sequence[tuple[int, ...]]):
        self._drawn = deque(torch.rand(shape, generator=rng) for shape in shapes)

    def take(self, shape: torch.Size) -> torch.Tensor:
        if not self._drawn or self._drawn[0].shape != shape:
            raise RuntimeError(
                f"merge method asked for uniforms of shape {tuple(shape)} that it did not declare"
            )
        return self._drawn.popleft()

    def check_used(self) -> None:
        if self._drawn:
            raise RuntimeError(f"merge method declared {len(self._drawn)} uniform draws it did not take")


def draw(probs: torch.Tensor | float, shape: torch.Size, rng: torch.Generator | Uniforms) -> torch.Tensor:
    """Keep mask (fp32 1.0/0.0), one Bernoulli draw per element, row-major.

    torch's CPU `bernoulli(p)` keeps an element when a float uniform u from the generator is below p, and
    `torch.rand` draws the same u's in the same order, leaving the generator in the same state; the comparison
    is then one vectorised pass, three times faster than bernoulli's per-element loop. (tests/test_methods.py
    checks the masks and the generator state against `torch.bernoulli` itself.)"""
    if isinstance(probs, torch.Tensor):
        probs = probs.float()
    uniforms = rng.take(shape) if isinstance(rng, Uniforms) else torch.rand(shape, generator=rng)
    return torch.lt(uniforms, probs, out=uniforms)


def bernoulli(
    delta: torch.Tensor, density: float, rescale_norm: str | None, rng: torch.Generator
) -> torch.Tensor:
    """DARE: keep each element independently with probability `density` (one draw per element, row-major)."""
    if density >= 1:
        return delta
    p = float(torch.tensor(density, dtype=work_dtype(delta)))  # mergekit's fill value, rounded as it is
    keep = draw(p, delta.shape, rng)
    return _sparse(delta.to(work_dtype(delta)), keep, rescale_norm, density).to(delta.dtype)


def magprune_problem(density: float, epsilon: float) -> str | None:
    """MagPrune's keep probabilities span density ± epsilon, which must stay inside (0, 1) (density 1 keeps all)."""
    if density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        return f"della needs density ± epsilon inside (0, 1), got density {density} and epsilon {epsilon}"
    return None


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, rescale_norm: str | None, rng: torch.Generator
) -> torch.Tensor:
    """DELLA MagPrune: per row, keep probability rises linearly with |δ|'s rank, from density−ε to density+ε.

    1-D tensors are one row. The probabilities are computed with mergekit's arithmetic, in the same order, so the
    Bernoulli draws see bit-identical thresholds.
    """
    if density >= 1:
        return delta
    if problem := magprune_problem(density, epsilon):
        raise ValueError(problem)
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
    # 1-D tensors were ranked as one row; the draws are row-major either way.
    probs = probs.reshape(delta.shape)
    keep = draw(probs, delta.shape, rng)
    return _sparse(delta.to(dtype), keep, rescale_norm, probs.float()).to(delta.dtype)
