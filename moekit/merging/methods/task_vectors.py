"""The sparsified task-arithmetic family: ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della,
della_linear. Each is base + λ·combine(wᵢ·sparsify(mᵢ − base)), with mergekit 0.1.5's numbers:

1. Each delta δᵢ = mᵢ − base is sparsified on its own (see sparsify.py), in config order; the random methods
   draw their masks from the run's generator in that order.
2. Each sparse delta is multiplied by its weight.
3. With a sign consensus (the *_ties methods and della), the elected sign is that of Σ wᵢδ̂ᵢ (≥ 0 counts as +),
   and only elements whose sign agrees survive; the divisor for `normalize` is the sum of the weights of the
   models that survived at each element (0 becomes 1). Without consensus the divisor is Σwᵢ (|Σwᵢ| < 1e-8 → 1).
4. `normalize` divides by the divisor, then λ scales, then the base is added.

mergekit stacks every delta ([n, *shape] in the compute dtype) and multiplies masks into copies of that stack.
Here each input is turned into its weighted sparse delta in place (the engine's inputs are ours to overwrite) and
added into the vote; the second pass zeroes the disagreeing elements of each, in place, and sums them. The vote
(and then the elected sign) lives in an input buffer a sparsifier left free when it can, so peak extra memory is
at most the vote and a few one-delta temporaries, whatever the number of models.

Paper variants, off by default: `sign_vote: sum` is the TIES paper's unweighted vote (the sign of the sum of
the trimmed task vectors before weighting) and `sign_vote: count` is a majority of signs; `rescale_norm:
inverse_density` is the DARE/DELLA papers' 1/keep-probability rescale instead of mergekit's L1 matching.
`int8_mask` is accepted for mergekit compatibility and ignored: masks here are always one-byte bools.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from moekit.merging.methods.sparsify import (
    RESCALE_NORMS,
    bernoulli,
    della_magprune,
    magnitude,
    magnitude_outliers,
    magprune_problem,
)
from moekit.merging.registry import Param, in_range, merge_method

Tensors = list[torch.Tensor]
SIGN_VOTES = ("weighted_sum", "sum", "count")


def one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def common_params(normalize: bool, rescale: bool) -> list[Param]:
    return [
        Param("weight", float, per_model=True, help="weight of each task vector"),
        Param(
            "density",
            float,
            default=1.0,
            per_model=True,
            check=in_range(0, 1, lo_open=True),
            help="fraction kept",
        ),
        Param("lambda", float, default=1.0, help="scale applied to the combined task vectors"),
        Param("normalize", bool, default=normalize, help="divide by the sum of the (surviving) weights"),
        Param("rescale", bool, default=rescale, help="rescale each sparse delta to the dense delta's norm"),
        Param("rescale_norm", str, default="l1", check=one_of(RESCALE_NORMS), help="norm matched by rescale"),
        Param(
            "int8_mask", bool, default=False, help="accepted for mergekit configs; ignored (masks are bool)"
        ),
    ]


VOTE = Param(
    "sign_vote", str, default="weighted_sum", check=one_of(SIGN_VOTES), help="how the sign is elected"
)
GAMMA = Param(
    "gamma", float, default=0.01, per_model=True, check=in_range(0, 1), help="fraction of largest |δ| dropped"
)
EPSILON = Param(
    "epsilon", float, default=0.15, per_model=True, check=in_range(0, 1), help="spread of keep probability"
)

Sparsifier = Callable[[torch.Tensor, int], torch.Tensor]  # (delta, model index) -> sparse delta, in place


def merge_task_vectors(
    tensors: Tensors,
    base: torch.Tensor,
    weight: list[float],
    sparsify: Sparsifier,
    consensus: str | None,
    normalize: bool,
    lambda_: float,
    mergekit_order: bool = False,
) -> torch.Tensor:
    """base + λ·combine(wᵢ·sparsify(mᵢ − base)); `consensus` is None (plain sum) or a sign-vote rule.

    `mergekit_order` (compute_dtype: mergekit) stacks the deltas and reduces them with mergekit's own torch calls:
    torch's sum over a stacked axis of 5 or more adds the last few elements of a row in another order than a
    running sum, which can flip a near-zero sign vote. It holds all n deltas at once, as mergekit does."""
    # mergekit holds the weights as a tensor of the compute dtype, so a bf16 merge multiplies by bf16 weights.
    weights = torch.tensor(weight, dtype=base.dtype)
    if mergekit_order:
        return _stacked(tensors, base, weights, sparsify, consensus, normalize, lambda_)
    if consensus is None:
        mixed = None
        for i, m in enumerate(tensors):
            delta = m.sub_(base)  # the engine's inputs are ours to overwrite: no extra tensor-sized copy
            delta = sparsify(delta, i).mul_(weights[i])
            mixed = accumulate(mixed, delta)
            del delta
        total = float(weights.sum())
        divisor = 1.0 if abs(total) < 1e-8 else total
    else:
        mixed, divisor = _consensus_sum(tensors, base, weights, sparsify, consensus, normalize)
    mixed = mixed.to(base.dtype)
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)


def _stacked(tensors, base, weights, sparsify, consensus, normalize, lambda_) -> torch.Tensor:
    """merge_task_vectors in mergekit's operation order, over the stacked deltas."""
    deltas = torch.stack([sparsify(m.sub_(base), i) for i, m in enumerate(tensors)])
    tensors.clear()
    w = weights.reshape(-1, *[1] * base.dim())
    if consensus == "sum":  # the paper's vote is on the unweighted deltas
        vote = deltas.sum(dim=0)
    deltas.mul_(w)
    if consensus is None:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    else:
        signs = deltas.sign()
        if consensus == "count":
            vote = signs.sum(dim=0)
        elif consensus == "weighted_sum":
            vote = deltas.sum(dim=0)
        elected = (vote >= 0).to(base.dtype) * 2 - 1
        agree = signs == elected
        mixed = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


def accumulate(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """total + x, in place when possible. Half-precision inputs are summed in fp32 and rounded by the caller
    once at the end, as torch's sum over the stacked deltas does in mergekit."""
    if total is None:
        return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    return total.add_(x)


def _consensus_sum(
    tensors: Tensors,
    base: torch.Tensor,
    weights: torch.Tensor,
    sparsify: Sparsifier,
    consensus: str,
    need_divisor: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Σ agreeing wᵢδ̂ᵢ, Σ agreeing wᵢ with 0 → 1 or None when not needed), in two passes over the deltas."""
    deltas: list[torch.Tensor | None] = []
    ballots: list[torch.Tensor] = []  # held only until the vote has a buffer of its own
    spare = vote = None
    for i, m in enumerate(tensors):
        sparse = sparsify(m.sub_(base), i)
        if sparse.data_ptr() != m.data_ptr():
            spare = m  # the sparsifier wrote over its mask and spent m: its buffer can hold the vote
        if consensus != "sum":  # the paper's vote is on the unweighted task vectors: weigh after voting
            sparse = sparse.mul_(weights[i])
        ballots.append(sparse.sign() if consensus == "count" else sparse)
        vote = _tally(vote, ballots, spare, last=i == len(tensors) - 1)
        deltas.append(sparse)
    del ballots, spare
    # The elected sign, ±1.0 in the vote's buffer. copysign(1, v) is mergekit's `(v >= 0) * 2 - 1` except at
    # v = -0.0, which only a sum of zeros gives (an exact cancellation rounds to +0.0), where every delta is 0
    # and the sign picks nothing; NaN poisons the element either way.
    sign = torch.copysign(torch.ones((), dtype=vote.dtype), vote, out=vote)
    # d·s is |d| where d agrees with the sign and -|d| where it does not, exactly, so mergekit's Σ d·[sign(d) = s]
    # is s·Σ max(d·s, 0), value for value: two in-place passes per delta and no mask. (A float mask, if one
    # is needed, not a bool one: a bool operand sends a multiply down a dtype-promoting path ~10× slower.)
    mixed = divisor = agrees = None
    for i in range(len(deltas)):
        d, deltas[i] = deltas[i], None
        if consensus == "sum":
            d.mul_(weights[i])
        d.mul_(sign)
        if need_divisor:  # the weight where the model survived (adding w·1 is exact: same bits as mergekit's)
            if divisor is None:
                divisor = torch.zeros_like(sign)
                agrees = torch.empty_like(sign)
            divisor.add_(torch.gt(d, 0, out=agrees), alpha=float(weights[i]))
        mixed = accumulate(mixed, d.clamp_(min=0))
        del d
    mixed.mul_(sign)
    if divisor is not None:
        divisor = divisor.to(base.dtype)
        divisor[divisor == 0] = 1
    return mixed, divisor


def _tally(vote: torch.Tensor | None, ballots: Tensors, spare: torch.Tensor | None, last: bool):
    """The running vote, Σ ballots so far, in a buffer that no delta needs (ballots are deltas). It waits for a
    second ballot, so the first sum can go straight into a spent input's buffer; half precision is summed in
    fp32, as torch.sum over the stacked deltas does in mergekit."""
    if vote is not None:
        return vote.add_(ballots.pop())
    if len(ballots) < 2 and not last:
        return None
    first = ballots.pop(0)
    if first.dtype in (torch.bfloat16, torch.float16):
        vote = first.float()
    elif spare is not None and spare.dtype == first.dtype and spare.shape == first.shape:
        vote = spare.copy_(first) if not ballots else torch.add(first, ballots.pop(), out=spare)
    else:
        vote = first.clone() if not ballots else first + ballots.pop()
    return vote.add_(ballots.pop()) if ballots else vote


def one_draw_per_sparsified_model(params: dict, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """DARE and DELLA draw one uniform per element for each model they sparsify (density < 1), in config order."""
    return [shape for density in params["density"] if density < 1]


class Sparsification(NamedTuple):
    """How a family member trims each delta: `fn(delta, density, *extra, rescale_norm, rng | by_sort)`."""

    fn: Callable[..., torch.Tensor]
    extra: tuple[Param, ...]  # the per-model parameters fn takes besides density
    random: bool  # draws its masks from the run's generator (`rng`); else `by_sort` breaks top-k ties


MAGNITUDE = Sparsification(magnitude, (), random=False)
OUTLIERS = Sparsification(magnitude_outliers, (GAMMA,), random=False)
BERNOULLI = Sparsification(bernoulli, (), random=True)
MAGPRUNE = Sparsification(della_magprune, (EPSILON,), random=True)


class Member(NamedTuple):
    """One method of the family, as mergekit 0.1.5 registers its generalised task arithmetic."""

    sparsification: Sparsification
    consensus: bool  # the TIES sign vote (declares `sign_vote`); else the plain weighted sum
    normalize: bool  # the default of `normalize`
    rescale: bool  # the default of `rescale`
    doc: str


FAMILY = {
    "ties": Member(
        MAGNITUDE, consensus=True, normalize=True, rescale=False,
        doc="TIES: keep each delta's top-k by magnitude, elect a sign per element, average the agreeing deltas.",
    ),
    "dare_ties": Member(
        BERNOULLI, consensus=True, normalize=False, rescale=True,
        doc="DARE + TIES: drop each delta element with probability 1 − density, rescale, then the TIES sign vote.",
    ),
    "dare_linear": Member(
        BERNOULLI, consensus=False, normalize=False, rescale=True,
        doc="DARE: drop each delta element with probability 1 − density, rescale, and add the weighted deltas.",
    ),
    "breadcrumbs": Member(
        OUTLIERS, consensus=False, normalize=False, rescale=False,
        doc="Model Breadcrumbs: drop the largest (outliers) and the smallest deltas, add the weighted rest.",
    ),
    "breadcrumbs_ties": Member(
        OUTLIERS, consensus=True, normalize=False, rescale=False,
        doc="Model Breadcrumbs with the TIES sign vote.",
    ),
    "della": Member(
        MAGPRUNE, consensus=True, normalize=True, rescale=True,
        doc="DELLA: magnitude-ranked random drop (MagPrune), rescale, the TIES sign vote, then the agreeing average.",
    ),
    "della_linear": Member(
        MAGPRUNE, consensus=False, normalize=False, rescale=True,
        doc="DELLA without the sign vote: MagPrune, rescale, and add the weighted deltas.",
    ),
}  # fmt: skip


def family_member(sparsification: Sparsification, doc: str) -> Callable[..., torch.Tensor]:
    """The merge function of a FAMILY member. `sign_vote` is declared only where the row has a consensus, so
    its absence (None) is the plain weighted sum."""

    def merge(
        tensors: Tensors,
        base: torch.Tensor,
        *,
        weight: list[float],
        density: list[float],
        lambda_: float,
        normalize: bool,
        rescale: bool,
        rescale_norm: str,
        int8_mask: bool,
        sign_vote: str | None = None,
        rng=None,
        mergekit_order: bool = False,
        **extra: list[float],
    ) -> torch.Tensor:
        options = {"rng": rng} if sparsification.random else {"by_sort": mergekit_order}
        sparsify = per_model_sparsifier(
            sparsification.fn, density, **extra, rescale_norm=rescale_norm if rescale else None, **options
        )
        return merge_task_vectors(
            tensors, base, weight, sparsify, sign_vote, normalize, lambda_, mergekit_order
        )

    merge.__doc__ = doc
    return merge


def per_model_sparsifier(fn: Callable[..., torch.Tensor], density: list[float], **per_model) -> Sparsifier:
    """fn(delta, density[i], **per_model at i): list values are taken per model, scalars as they are."""

    def sparsify(delta: torch.Tensor, i: int) -> torch.Tensor:
        return fn(delta, density[i], **{k: v[i] if isinstance(v, list) else v for k, v in per_model.items()})

    return sparsify


def register_family() -> None:
    for name, member in FAMILY.items():
        params = [
            *common_params(normalize=member.normalize, rescale=member.rescale),
            *member.sparsification.extra,
            *([VOTE] if member.consensus else []),
        ]
        draws = one_draw_per_sparsified_model if member.sparsification.random else None
        fn = family_member(member.sparsification, member.doc)
        check = magprune_parameters if member.sparsification is MAGPRUNE else None
        merge_method(name, base="required", params=params, draws=draws, check_tensor=check)(fn)


def magprune_parameters(params: dict) -> str | None:
    return next(filter(None, map(magprune_problem, params["density"], params["epsilon"])), None)


register_family()
