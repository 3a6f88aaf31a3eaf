"""Every merge method against an independent, deliberately plain formula written here, on fresh random tensors.

The references use full sorts, stacked tensors and explicit loops: the slow, obvious way. Methods are called
through the registry exactly as the engine calls them (non-base tensors in config order, the base apart,
per-model parameters as lists, `rng` for the random ones).
"""

from __future__ import annotations

import math

import pytest
import torch

from moekit.merging.registry import get_method

TOL = 1e-6  # fp32: |method - reference| <= TOL * (1 + |reference|), element-wise


def close(got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> bool:
    return bool(((got - want).abs() <= tol * (1 + want.abs())).all())


def call(name: str, tensors, base=None, seed: int | None = None, **params):
    """Run a registered method with its declared defaults filled in, as the engine would."""
    method = get_method(name)
    kwargs = {}
    for p in method.params:
        value = params.pop(p.name, p.default)
        if p.per_model and not isinstance(value, list):
            value = [value] * len(tensors)
        kwargs[p.py_name] = value
    assert not params, f"unknown test params {params}"
    if method.random:
        kwargs["rng"] = torch.Generator().manual_seed(seed)
    return method.fn([t.clone() for t in tensors], None if base is None else base.clone(), **kwargs)


def random_models(n: int, shape=(48, 40), seed: int = 0, spread: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + spread * (i + 1) * torch.randn(shape, generator=g) for i in range(n)]


# ----- references -----------------------------------------------------------------------------------------------


def ref_topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, int(density * delta.numel()))
    order = torch.sort(delta.abs().reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(delta.numel())
    mask[order[:k]] = 1
    return mask.reshape(delta.shape)


def ref_window_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n)
    mask[order[bottom : bottom + target]] = 1
    return mask.reshape(delta.shape)


def ref_combine(base, deltas, weights, consensus: bool, normalize: bool, lam: float):
    """base + λ·(Σ agreeing wδ) / (Σ agreeing w), the straightforward stacked way."""
    weighted = torch.stack([w * d for w, d in zip(weights, deltas)])
    w = torch.tensor(weights).view(-1, *([1] * base.dim()))
    if consensus:
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(weighted) == elected).float()
        mixed = (weighted * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = w.sum()
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def l1_rescaled(delta, mask):
    sparse = delta * mask
    return sparse * (delta.abs().sum() / sparse.abs().sum())


# ----- TIES / breadcrumbs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 40), (300,)])
def test_ties_matches_full_sort_reference(shape):
    base, models = random_models(3, shape, seed=1)
    weight, density, lam = [0.7, 0.4, 1.1], [0.3, 0.55, 0.8], 0.9
    got = call("ties", models, base, weight=weight, density=density, **{"lambda": lam})
    deltas = [(m - base) * ref_topk_mask(m - base, d) for m, d in zip(models, density)]
    assert close(got, ref_combine(base, deltas, weight, consensus=True, normalize=True, lam=lam))


def test_ties_keeps_exactly_k_even_with_tied_magnitudes():
    base = torch.zeros(1000)
    model = (torch.arange(1000) % 7 - 3).float()  # only 4 distinct magnitudes
    got = call("ties", [model], base, weight=1.0, density=0.3)
    assert int((got != 0).sum()) == 300
    assert got.abs().min() == 0 and (got[got != 0].abs() >= 2).all()  # the largest magnitudes won


@pytest.mark.parametrize("vote", ["weighted_sum", "count"])
def test_sign_vote_that_cancels_exactly_elects_plus(vote):
    """Where the ballots cancel exactly the vote is +0.0 and the elected sign is +, as mergekit's `vote >= 0`:
    the positive deltas survive there. Elsewhere fresh random deltas vote as usual."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))

    def dyadic(scale):  # random multiples of 1/1024: sums and differences here are exact in fp32
        return torch.randint(-scale, scale + 1, (64, 8), generator=g).float() / 1024

    base, x, y = dyadic(4096), dyadic(1024), dyadic(1024)
    y[::2] = -x[::2]  # every other row cancels exactly
    got = call("ties", [base + x, base + y], base, weight=1.0, density=1.0, sign_vote=vote)
    dx, dy = (base + x) - base, (base + y) - base  # the deltas as the method sees them (rounded)
    if vote == "count":  # the reference: a majority of signs, 0 counting as +
        elected = torch.where(dx.sign() + dy.sign() >= 0, 1.0, -1.0)
        agree = torch.stack([(d.sign() == elected).float() for d in (dx, dy)])
        mixed, divisor = (torch.stack([dx, dy]) * agree).sum(0), agree.sum(0)
        want = base + mixed / torch.where(divisor == 0, 1.0, divisor)
    else:
        want = ref_combine(base, [dx, dy], [1.0, 1.0], consensus=True, normalize=True, lam=1.0)
    cancelled = (dx + dy == 0) & (dx != 0)
    assert cancelled.any() and (cancelled | (dx == 0))[::2].all()
    assert torch.equal(got[cancelled], (base + dx.clamp(min=0) + dy.clamp(min=0))[cancelled])
    assert close(got, want)


def test_ties_rescale_and_paper_vote():
    base, models = random_models(3, seed=2)
    weight, density = [2.0, 0.3, 0.5], [0.5, 0.5, 0.5]
    got = call("ties", models, base, weight=weight, density=density, rescale=True, normalize=False)
    deltas = [l1_rescaled(m - base, ref_topk_mask(m - base, d)) for m, d in zip(models, density)]
    assert close(got, ref_combine(base, deltas, weight, consensus=True, normalize=False, lam=1.0))

    # sign_vote: sum is the paper's unweighted vote; with uneven weights it must differ from the default.
    paper = call("ties", models, base, weight=weight, density=density, sign_vote="sum")
    sparse = [(m - base) * ref_topk_mask(m - base, d) for m, d in zip(models, density)]
    elected = torch.where(torch.stack(sparse).sum(0) >= 0, 1.0, -1.0)
    agree = [(torch.sign(d) == elected).float() for d in sparse]
    num = sum(w * d * a for w, d, a in zip(weight, sparse, agree))
    den = sum(w * a for w, a in zip(weight, agree))
    want = base + num / torch.where(den == 0, 1.0, den)
    assert close(paper, want)
    assert not torch.equal(paper, call("ties", models, base, weight=weight, density=density))


@pytest.mark.parametrize("consensus", [False, True])
def test_breadcrumbs_matches_sorted_window(consensus):
    base, models = random_models(2, (60, 30), seed=3)
    weight, density, gamma = [0.6, 0.9], [0.7, 0.9], [0.05, 0.2]  # 0.9 + 0.2 > 1 shrinks the outlier cut
    name = "breadcrumbs_ties" if consensus else "breadcrumbs"
    got = call(name, models, base, weight=weight, density=density, gamma=gamma)
    deltas = [(m - base) * ref_window_mask(m - base, d, g) for m, d, g in zip(models, density, gamma)]
    assert close(got, ref_combine(base, deltas, weight, consensus=consensus, normalize=False, lam=1.0))


# ----- DARE / DELLA ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("consensus", [False, True])
def test_dare_matches_reference_draws(consensus):
    base, models = random_models(3, seed=4)
    weight, density = [0.5, 1.2, 0.8], [0.3, 0.6, 0.9]
    name = "dare_ties" if consensus else "dare_linear"
    got = call(name, models, base, seed=7, weight=weight, density=density)
    g = torch.Generator().manual_seed(7)  # mergekit's stream: one bernoulli per model, in config order
    deltas = []
    for m, d in zip(models, density):
        mask = torch.bernoulli(torch.full(base.shape, d), generator=g)
        deltas.append(l1_rescaled(m - base, mask))
    assert close(got, ref_combine(base, deltas, weight, consensus=consensus, normalize=False, lam=1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draw_is_torch_bernoulli_bit_for_bit(dtype):
    """The keep mask comes from torch.rand < p; it must be the mask torch.bernoulli (mergekit's call) draws, and
    leave the generator where bernoulli leaves it, for scalar and per-element probabilities, mid-stream."""
    from moekit.merging.methods.sparsify import draw

    seed = int(torch.randint(0, 2**31, ()))
    for shape, per_element in (((257, 129), False), ((3001,), True), ((64, 33, 5), True)):
        density = float(torch.rand(()) * 0.98 + 0.01)
        probs = torch.rand(shape) if per_element else torch.full(shape, density)
        probs = probs.to(dtype)
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        lead = int(torch.randint(0, 1000, ()))  # start mid-way through the generator's 624-word block
        torch.rand(lead, generator=ours), torch.rand(lead, generator=theirs)
        got = draw(probs if per_element else float(probs.flatten()[0]), shape, ours)
        want = torch.bernoulli(probs, generator=theirs)
        assert torch.equal(got, want.float()), (seed, shape)
        assert torch.equal(ours.get_state(), theirs.get_state())


def test_dare_kept_fraction_and_l1_rescale():
    base = torch.randn(400, 500)
    model = base + torch.randn(400, 500)
    for density in (0.1, 0.5, 0.85):
        delta = call("dare_linear", [model], base, seed=3, weight=1.0, density=density) - base
        kept = (delta != 0).float().mean().item()
        assert abs(kept - density) < 0.01  # 200k Bernoulli draws: the std of the fraction is < 0.0012
        dense = (model - base).abs().sum()
        assert abs(delta.abs().sum() / dense - 1) < 1e-5  # fp32 sums over 200k elements
        paper = call(
            "dare_linear", [model], base, seed=3, weight=1.0, density=density, rescale_norm="inverse_density"
        )
        survivors = paper != base
        assert close((paper - base)[survivors], (model - base)[survivors] / density, 1e-5)


def test_dare_same_seed_same_mask_other_seed_other_mask():
    base, models = random_models(2, seed=5)
    a = call("dare_ties", models, base, seed=11, weight=1.0, density=0.5)
    b = call("dare_ties", models, base, seed=11, weight=1.0, density=0.5)
    c = call("dare_ties", models, base, seed=12, weight=1.0, density=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def ref_della(delta, density, eps, g):
    rows = delta if delta.dim() == 2 else delta.unsqueeze(0)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).float()  # 0 = smallest |δ| in its row
    probs = (density - eps) + ranks / (rows.shape[1] - 1) * 2 * eps
    mask = torch.bernoulli(probs, generator=g).reshape(delta.shape)
    return l1_rescaled(delta, mask)


@pytest.mark.parametrize("consensus", [False, True])
def test_della_matches_reference_draws(consensus):
    base, models = random_models(2, (40, 64), seed=6)
    weight, density, eps = [0.8, 0.5], [0.4, 0.6], [0.1, 0.25]
    name = "della" if consensus else "della_linear"
    got = call(name, models, base, seed=9, weight=weight, density=density, epsilon=eps)
    g = torch.Generator().manual_seed(9)
    deltas = [ref_della(m - base, d, e, g) for m, d, e in zip(models, density, eps)]
    assert close(
        got, ref_combine(base, deltas, weight, consensus=consensus, normalize=consensus, lam=1.0), 1e-5
    )


def test_della_keeps_large_magnitudes_more_often():
    base = torch.zeros(200, 400)
    model = torch.randn(200, 400)
    delta = call("della_linear", [model], base, seed=1, weight=1.0, density=0.5, epsilon=0.3)
    kept = delta != 0
    large = model.abs() > model.abs().median(dim=1, keepdim=True).values
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    # Expected keep rates: 0.35 in the lower half of each row, 0.65 in the upper half.
    assert abs(kept[large].float().mean().item() - 0.65) < 0.01
    assert abs(kept[~large].float().mean().item() - 0.35) < 0.01


def test_della_rejects_epsilon_past_density():
    base, models = random_models(1, seed=8)
    with pytest.raises(ValueError, match="density ± epsilon"):
        call("della", models, base, seed=0, weight=1.0, density=0.1, epsilon=0.2)


# ----- spherical ------------------------------------------------------------------------------------------------


def ref_slerp(t, a, b, linear_above: float = 0.9995):
    """Slerp over the flattened tensors; linear when |cos| > linear_above (slerp's 0.9995; nuslerp only at 1)."""
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    cos = torch.dot(x / x.norm(), y / y.norm()).clamp(-1, 1)
    if cos.abs() > linear_above or cos.abs() == 1:
        return ((1 - t) * a.double() + t * b.double()).float()
    theta = torch.acos(cos)
    return (
        (torch.sin((1 - t) * theta) * a.double() + torch.sin(t * theta) * b.double()) / torch.sin(theta)
    ).float()


@pytest.mark.parametrize("t", [0.0, 0.27, 0.5, 1.0])
def test_slerp_matches_formula(t):
    base, models = random_models(1, seed=10, spread=1.0)
    got = call("slerp", models, base, t=t)
    assert close(got, ref_slerp(t, base, models[0]))
    if t == 0.0:
        assert torch.equal(got, base)


def test_slerp_falls_back_to_linear_for_parallel_tensors():
    base = torch.randn(30, 20)
    model = 2.5 * base + 1e-4 * torch.randn(30, 20)  # |cos| > 0.9995
    assert close(call("slerp", [model], base, t=0.3), 0.7 * base + 0.3 * model)


@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_matches_formula(flatten, row_wise, with_base):
    base, models = random_models(2, (24, 36), seed=11, spread=1.0)
    weight = [0.3, 0.9]
    got = call(
        "nuslerp",
        models,
        base if with_base else None,
        weight=weight,
        nuslerp_flatten=flatten,
        nuslerp_row_wise=row_wise,
    )
    t = 0.9 / 1.2
    a, b = (models[0] - base, models[1] - base) if with_base else (models[0], models[1])
    if flatten:
        want = ref_slerp(t, a, b, linear_above=1)
    elif row_wise:  # vectors along dim 0: the columns
        want = torch.stack([ref_slerp(t, a[:, j], b[:, j], linear_above=1) for j in range(a.shape[1])], dim=1)
    else:
        want = torch.stack([ref_slerp(t, a[i], b[i], linear_above=1) for i in range(a.shape[0])])
    assert close(got, want + (base if with_base else 0), 1e-5)


def test_multislerp_of_two_is_the_slerp_midpoint_direction_times_mean_norm():
    base, models = random_models(2, seed=12, spread=1.0)
    a, b = models[0] - base, models[1] - base
    got = call("multislerp", models, base, weight=[1.0, 1.0])
    mid = ref_slerp(0.5, a / a.norm(), b / b.norm())
    want = base + mid / mid.norm() * (a.norm() + b.norm()) / 2
    assert close(got, want, 1e-5)  # eps = 1e-8 guards move the result by ~1e-8 relative


def test_multislerp_three_models_matches_tangent_space_formula():
    _, models = random_models(3, (20, 25), seed=13, spread=1.0)
    weight = [0.2, 0.5, 0.3]
    got = call("multislerp", models, weight=weight)
    x = torch.stack([m.reshape(-1) for m in models]).double()
    w = torch.tensor(weight, dtype=torch.float64)
    norms = x.norm(dim=1, keepdim=True)
    units = x / norms
    mean = (w[:, None] * units).sum(0)
    mean = mean / mean.norm()
    tangent = (w[:, None] * (units - (units @ mean)[:, None] * mean)).sum(0)
    tn = tangent.norm()
    want = (mean * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (w * norms.squeeze(1)).sum()
    assert close(got, want.reshape(models[0].shape).float(), 1e-5)


def test_karcher_of_two_is_the_geodesic_midpoint():
    _, models = random_models(2, seed=14, spread=1.0)
    a, b = models
    got = call("karcher", models)
    mid = ref_slerp(0.5, a / a.norm(), b / b.norm())
    assert close(got, mid / mid.norm() * (a.norm() + b.norm()) / 2, 1e-5)


def test_karcher_of_three_is_a_fixed_point():
    _, models = random_models(3, (16, 16), seed=15, spread=1.0)
    got = call("karcher", models, max_iter=100, tol=1e-7)
    mean = (got / got.norm()).double()
    # At the Karcher mean the log-map vectors of the inputs sum to zero.
    total = torch.zeros_like(mean).reshape(-1)
    for m in models:
        u = (m / m.norm()).double().reshape(-1)
        cos = torch.dot(mean.reshape(-1), u).clamp(-1, 1)
        theta = torch.acos(cos)
        total += theta / torch.sin(theta) * (u - cos * mean.reshape(-1))
    assert total.norm() < 1e-5
    assert math.isclose(got.norm().item(), sum(m.norm().item() for m in models) / 3, rel_tol=1e-5)


# ----- model_stock, sce, nearswap, arcee_fusion ----------------------------------------------------------------


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_formula(filter_wise):
    base, models = random_models(3, (12, 50), seed=16)
    got = call("model_stock", models, base, filter_wise=filter_wise)
    rows = [(m - base) if filter_wise else (m - base).reshape(1, -1) for m in models]
    cos = []
    for i in range(3):
        for j in range(i + 1, 3):
            cos.append(torch.nn.functional.cosine_similarity(rows[i], rows[j], dim=1))
    c = torch.stack(cos).mean(0)
    t = (3 * c / (1 + 2 * c)).unsqueeze(1)
    avg = sum(models) / 3
    want = (t * avg.reshape(t.shape[0], -1) + (1 - t) * base.reshape(t.shape[0], -1)).reshape(base.shape)
    assert close(got, want, 1e-5)


@pytest.mark.parametrize("select_topk", [1.0, 0.35])
def test_sce_matches_formula(select_topk):
    base, models = random_models(3, (30, 30), seed=17)
    got = call("sce", models, base, select_topk=select_topk)
    tv = torch.stack([m - base for m in models])
    if select_topk < 1:
        var = tv.var(dim=0, unbiased=False).reshape(-1)
        k = int((var != 0).sum() * select_topk)
        keep = torch.zeros_like(var)
        keep[torch.sort(var, descending=True, stable=True).indices[:k]] = 1
        tv = tv * keep.reshape(base.shape)
    energy = (tv**2).mean(dim=(1, 2))
    w = (energy / energy.sum()).view(-1, 1, 1)
    agree = (torch.sign(tv) == torch.where(tv.sum(0) >= 0, 1.0, -1.0)).float()
    want = base + (tv * w * agree).sum(0) / (w * agree).sum(0).clamp(min=1e-6)
    assert close(got, want)


def test_nearswap_matches_formula():
    base, models = random_models(1, seed=18)
    t = 0.05
    got = call("nearswap", models, base, t=t)
    diff = (base - models[0]).abs()
    w = torch.clamp(t / torch.clamp(diff, min=1e-6), 0, 1)
    assert close(got, w * models[0] + (1 - w) * base)
    near = diff < t
    assert near.any() and torch.equal(got[near], models[0][near])


def test_arcee_fusion_matches_formula():
    base, models = random_models(1, (40, 50), seed=19)
    m = models[0]
    got = call("arcee_fusion", models, base, seed=0)
    p = torch.softmax(m, -1) + 1e-8
    q = torch.softmax(base, -1) + 1e-8
    importance = (m - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    ordered = importance.reshape(-1).sort().values
    n = ordered.numel() - 1
    q1, med, q3 = (ordered[int(f * n)] for f in (0.25, 0.5, 0.75))
    take = importance >= med + 1.5 * (q3 - q1)
    assert take.any() and not take.all()
    assert close(got, torch.where(take, m, base))


@pytest.mark.parametrize("layout", ["random", "tied", "sample_misses"])
def test_kth_smallest_is_exact_on_large_tensors(layout):
    """The sampled bracket must never change the answer, including when the strided sample is unrepresentative."""
    from moekit.merging.methods.sparsify import SAMPLE, kth_smallest, top_k_mask

    n = 8 * SAMPLE + 12345
    g = torch.Generator().manual_seed(20)
    values = torch.randn(n, generator=g)
    if layout == "tied":
        values = torch.randint(0, 40, (n,), generator=g).float()
    elif layout == "sample_misses":
        values[:: n // SAMPLE] = 0.0  # every sampled element equal: the bracket is a single value
    ordered = torch.sort(values).values
    for r in (1, n // 3, n // 2 + 7, n - 1):
        assert kth_smallest(values, r) == ordered[r - 1]
    keep = top_k_mask(values.clone(), n // 4)
    if layout == "tied":  # equal entries straddle the threshold: the caller's sort (mergekit's) chooses
        assert keep is None
        return
    keep = keep.bool()
    assert int(keep.sum()) == n // 4
    assert values[keep].min() >= values[~keep].max()


def test_count_vote_and_other_rescale_norms():
    base, models = random_models(3, seed=21)
    weight, density = [1.5, 0.5, 0.7], [0.6, 0.6, 0.6]
    sparse = [(m - base) * ref_topk_mask(m - base, d) for m, d in zip(models, density)]
    got = call("ties", models, base, weight=weight, density=density, sign_vote="count")
    elected = torch.where(sum(torch.sign(w * d) for w, d in zip(weight, sparse)) >= 0, 1.0, -1.0)
    agree = [(torch.sign(d) == elected).float() for d in sparse]
    den = sum(w * a for w, a in zip(weight, agree))
    want = base + sum(w * d * a for w, d, a in zip(weight, sparse, agree)) / torch.where(den == 0, 1.0, den)
    assert close(got, want)

    for norm, measure in (("l2", torch.linalg.vector_norm), ("linf", lambda x: x.abs().max())):
        got = call(
            "breadcrumbs",
            models[:1],
            base,
            weight=1.0,
            density=0.5,
            gamma=0.1,
            rescale=True,
            rescale_norm=norm,
        )
        dense = models[0] - base
        sparse = dense * ref_window_mask(dense, 0.5, 0.1)
        assert close(got, base + sparse * (measure(dense) / measure(sparse)))
