"""`compute_dtype: mergekit`: mergekit 0.1.5's arithmetic bit for bit, on bf16 and fp16 inputs too.

Each reference below is mergekit's operation order written out in torch here (stack the deltas, weights as a
tensor of the inputs' dtype, torch's sum over the stack, ...), on fresh random inputs, and the comparison is
exact (torch.equal): the mode promises mergekit's bits, not closeness. The default fp32 arithmetic is checked
against the same formulas in float64 (tolerance 1e-5 relative to the tensor's scale).
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_tensors
from hostile_models import write_model

import moekit
from moekit.merging.registry import get_method

HALF = [torch.bfloat16, torch.float16]


def inputs(dtype, n=3, shape=(48, 40)):
    base = torch.randn(shape).to(dtype)
    return base, [(base.float() + 0.02 * torch.randn(shape)).to(dtype) for _ in range(n)]


def call(method: str, models, base, exact: bool, **params):
    m = get_method(method)
    kwargs = {p.py_name: params.get(p.name, p.default) for p in m.params}
    if exact and m.takes_mergekit_order:  # what the planner passes under compute_dtype: mergekit
        kwargs["mergekit_order"] = True
    return m.fn([x.clone() for x in models], None if base is None else base.clone(), **kwargs)


def mergekit_task_arithmetic(base, models, weight, lam, normalize, keep=None, consensus=False):
    """mergekit's generalised task arithmetic: deltas stacked in the inputs' dtype, weighted by a tensor of that
    dtype, summed over the stack (with the sign vote: masked first), divided, scaled, added to the base."""
    deltas = torch.stack([(m - base) * (1 if keep is None else keep[i]) for i, m in enumerate(models)])
    w = torch.tensor(weight, dtype=base.dtype).view(-1, *[1] * base.dim())
    deltas = deltas * w
    if consensus:
        elected = (deltas.sum(0) >= 0).to(base.dtype) * 2 - 1
        mask = deltas.sign() == elected
        mixed, divisor = (deltas * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(0), w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return (base + mixed).to(base.dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_task_arithmetic_bits(dtype):
    base, models = inputs(dtype)
    weight = torch.rand(3).add(0.1).tolist()
    lam = float(torch.rand(()) + 0.5)
    got = call("task_arithmetic", models, base, True, weight=weight, **{"lambda": lam})
    assert torch.equal(got, mergekit_task_arithmetic(base, models, weight, lam, False))


@pytest.mark.parametrize("dtype", HALF)
def test_linear_bits(dtype):
    """mergekit's linear is fp32 whatever the inputs: addcmul into zeros, divide by the fp32 weight sum, round."""
    _, models = inputs(dtype)
    weight = torch.rand(3).add(0.1).tolist()
    w = torch.tensor(weight)
    want = torch.zeros(models[0].shape)
    for x, c in zip(models, w):
        want.addcmul_(x, c)
    want = (want / w.sum()).to(dtype)
    assert torch.equal(call("linear", models, None, True, weight=weight), want)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_ties_bits_with_ties_at_the_threshold(dtype):
    """Many equal magnitudes at the top-k threshold (a quantised delta): the kept set is mergekit's argsort's,
    and the sign vote is reduced over the stack (here 6 models: torch's stacked sum adds a row's last elements in
    another order than a running sum)."""
    base = torch.randn(33, 29).to(dtype)
    models = [(base.float() + torch.randint(-4, 5, base.shape) / 64).to(dtype) for _ in range(6)]
    weight = torch.rand(6).add(0.1).tolist()
    density = [0.3, 0.5, 0.45, 0.6, 0.35, 0.5]
    keep = []
    for m, d in zip(models, density):
        w = (m - base).abs().reshape(-1).float()
        k = max(1, int(d * w.numel()))
        mask = torch.zeros(w.numel(), dtype=dtype)
        mask[torch.argsort(w, descending=True)[:k]] = 1
        keep.append(mask.view(base.shape))
    got = call("ties", models, base, True, weight=weight, density=density)
    want = mergekit_task_arithmetic(base, models, weight, 1.0, True, keep, consensus=True)
    assert torch.equal(got, want)


def test_default_fp32_top_k_ties_are_chosen_by_mergekits_sort():
    """Quantised fp32 deltas (many equal magnitudes at the top-k threshold), default compute: the kept elements
    are those of mergekit's descending argsort (TIES) and ascending sort (breadcrumbs), so the result is
    mergekit's exactly (torch.equal), not only the kept count."""
    base = torch.randn(41, 37)
    models = [base + torch.randint(-4, 5, base.shape) / 64 for _ in range(3)]
    weight = torch.rand(3).add(0.1).tolist()
    density = [0.3, 0.55, 0.45]
    keep = []
    for m, d in zip(models, density):
        w = (m - base).abs().reshape(-1)
        mask = torch.zeros(w.numel())
        mask[torch.argsort(w, descending=True)[: int(d * w.numel())]] = 1
        keep.append(mask.view(base.shape))
    got = call("ties", models, base, False, weight=weight, density=density)
    assert torch.equal(got, mergekit_task_arithmetic(base, models, weight, 1.0, True, keep, consensus=True))

    gamma, density = 0.05, [0.6, 0.5, 0.7]
    keep = []
    for m, d in zip(models, density):
        w = (m - base).abs().reshape(-1)
        n, target = w.numel(), int(d * w.numel())
        n_bot = max(0, n - target - int(gamma * n))
        mask = torch.zeros(n)
        mask[torch.sort(w).indices[n_bot : n_bot + target]] = 1
        keep.append(mask.view(base.shape))
    got = call("breadcrumbs", models, base, False, weight=weight, density=density, gamma=[gamma] * 3)
    assert torch.equal(
        got, mergekit_task_arithmetic(base, models, weight, 1.0, False, keep)
    )  # normalize: false


def test_ties_default_fp32_sign_vote_order():
    """The default (streaming) TIES vote with three models in fp32 adds the weighted deltas in mergekit's order:
    exactly mergekit's numbers where no magnitude ties at the threshold (continuous random inputs)."""
    base, models = inputs(torch.float32)
    weight = torch.randn(3).tolist()  # signs mixed: the vote is often near zero
    density = [0.7, 0.6, 0.8]
    keep = []
    for m, d in zip(models, density):
        w = (m - base).abs().reshape(-1)
        mask = torch.zeros(w.numel())
        mask[torch.topk(w, max(1, int(d * w.numel()))).indices] = 1
        keep.append(mask.view(base.shape))
    for normalize in (False, True):
        got = call("ties", models, base, False, weight=weight, density=density, normalize=normalize)
        want = mergekit_task_arithmetic(base, models, weight, 1.0, normalize, keep, consensus=True)
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", HALF)
def test_slerp_half_precision_is_fp32_inside(dtype):
    """Under a half-precision compute dtype, identical inputs are colinear (no 0/0) and the interpolation is
    mergekit's fp32 one, rounded once."""
    base, (other,) = inputs(dtype, 1)
    same = call("slerp", [base], base, False, t=0.4)
    assert torch.isfinite(same.float()).all() and torch.equal(same, base)
    a, b = base.float().reshape(-1), other.float().reshape(-1)
    dot = ((a / a.norm()) * (b / b.norm())).sum().clamp(-1, 1)
    theta = torch.acos(dot)
    t = torch.tensor(0.4)
    want = (torch.sin((1 - t) * theta) / torch.sin(theta)) * a + (torch.sin(t * theta) / torch.sin(theta)) * b
    got = call("slerp", [other], base, False, t=0.4)
    assert got.dtype == dtype
    # Within a rounding of the fp32 result (the fp32 reference itself may differ from moekit's chunked norms in
    # the last bit, so two units of the half type's epsilon); a half-precision slerp would be off by many.
    ulp = 2 * torch.finfo(dtype).eps * want.abs().view(base.shape) + torch.finfo(dtype).tiny
    assert ((got.float() - want.view(base.shape)).abs() <= ulp).all()


@pytest.mark.parametrize("dtype", HALF)
def test_multislerp_bits(dtype):
    base, models = inputs(dtype)
    weight = torch.rand(3).add(0.1).tolist()
    stack = torch.stack(models) - base
    w = torch.tensor(weight, dtype=dtype)
    w = w / w.sum()
    flat = stack.view(3, -1)
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + 1e-8)
    mean = (units * w.view(-1, 1)).sum(0)
    mean = mean / torch.norm(mean)
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
    tn = torch.norm(tangent) + 1e-8
    want = (mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * w).sum()
    want = want.view(base.shape) + base
    assert torch.equal(call("multislerp", models, base, True, weight=weight), want)


def test_mergekit_mode_end_to_end_bf16(tmp_path):
    """A bf16 task_arithmetic config with `compute_dtype: mergekit` writes mergekit's bits; the default fp32
    arithmetic stays within bf16 rounding of the float64 formula."""
    seeds = torch.randint(0, 2**31, (3,)).tolist()
    m = {n: write_model(tmp_path / n, s) for n, s in zip(["base", "ft1", "ft2"], seeds)}
    for n in m:  # store them in bf16, as a hub checkpoint would be
        t = load_tensors(m[n])
        from safetensors.torch import save_file

        save_file({k: v.to(torch.bfloat16) for k, v in t.items()}, str(m[n] / "model.safetensors"))
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(m["base"]),
        "models": [{"model": str(m["ft1"]), "parameters": {"weight": 0.7}}, {"model": str(m["ft2"])}],
        "parameters": {"weight": 0.45, "lambda": 0.8},
        "compute_dtype": "mergekit",
    }
    got = load_tensors(moekit.merge(cfg, tmp_path / "exact"))
    default = load_tensors(
        moekit.merge({k: v for k, v in cfg.items() if k != "compute_dtype"}, tmp_path / "d")
    )
    b, f1, f2 = (load_tensors(m[n]) for n in ("base", "ft1", "ft2"))
    for k in b:
        want = mergekit_task_arithmetic(b[k], [f1[k], f2[k]], [0.7, 0.45], 0.8, False)
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want), k
        exact64 = b[k].double() + 0.8 * (
            0.7 * (f1[k].double() - b[k].double()) + 0.45 * (f2[k].double() - b[k].double())
        )
        assert (default[k].double() - exact64).abs().max() <= 2**-8 * exact64.abs().max(), k


def test_ram_and_ramplus_tl_formulas():
    """ram: an element moved (|δ| > ε) by one model takes its δ, by several the mean of theirs; ramplus_tl scales
    each model's lone moves by 1 + r·min(shared/lone, alpha), counted per model over the tensor. Written per
    model with Python counts here, compared in float64 (tolerance 1e-6)."""
    base = torch.randn(30, 20, dtype=torch.float64)
    models = [base + torch.randn(30, 20, dtype=torch.float64) * (torch.rand(30, 20) < 0.5) for _ in range(3)]
    eps, r, alpha = 1e-5, 0.3, 0.2
    deltas = [m - base for m in models]
    moved = [d.abs() > eps for d in deltas]
    movers = sum(mv.long() for mv in moved)
    mean_of_movers = sum(d * mv for d, mv in zip(deltas, moved)) / movers.clamp(min=1)
    lone = [(mv & (movers == 1)) for mv in moved]
    want_ram = base + mean_of_movers * (movers > 1) + sum(d * lo for d, lo in zip(deltas, lone))
    got = call("ram", models, base, False)
    assert (got - want_ram).abs().max() <= 1e-6
    boosted = 0
    for d, mv, lo in zip(deltas, moved, lone):
        shared, alone = int((mv & (movers > 1)).sum()), int(lo.sum())
        boosted = boosted + d * lo * (1 + r * min(shared / max(alone, eps), alpha))
    want_plus = base + mean_of_movers * (movers > 1) + boosted
    got = call("ramplus_tl", models, base, False, r=r, alpha=alpha)
    assert (got - want_plus).abs().max() <= 1e-6


def _store(model_dir, cast) -> None:
    """Rewrite a checkpoint's tensors through `cast(name, tensor)`."""
    from safetensors.torch import save_file

    t = load_tensors(model_dir)
    save_file({k: cast(k, v) for k, v in t.items()}, str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("mode", [None, "mergekit"])
def test_mixed_precision_checkpoints_merge_in_the_promoted_dtype(tmp_path, mode):
    """mergekit's mixed-checkpoint test: one input bf16 (its norms kept fp32), the other fp32, no `dtype`. mergekit
    promotes each tensor's inputs to one dtype (fp32 here) and writes what the method returns: fp32 everywhere,
    (a + b) / 2 computed in fp32 (exact: torch.equal), in both compute modes. task_arithmetic on the same inputs
    is mergekit's stacked fp32 order."""
    a, b, c = (write_model(tmp_path / n, s) for n, s in zip("abc", torch.randint(0, 2**31, (3,)).tolist()))
    _store(a, lambda k, v: v if "norm" in k else v.bfloat16())
    ta, tb, tc = load_tensors(a), load_tensors(b), load_tensors(c)
    extra = {"compute_dtype": mode} if mode else {}
    cfg = {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]}
    got = load_tensors(moekit.merge(cfg | {"parameters": {"weight": 1.0}} | extra, tmp_path / "linear"))
    for k in ta:
        want = torch.zeros(ta[k].shape).addcmul_(ta[k].float(), torch.tensor(1.0))
        want = want.addcmul_(tb[k], torch.tensor(1.0)).div_(torch.tensor(2.0))
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want), k
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(a),
        "models": [{"model": str(b)}, {"model": str(c)}],
    }
    got = load_tensors(moekit.merge(cfg | {"parameters": {"weight": 0.6}} | extra, tmp_path / "ta"))
    for k in ta:
        want = mergekit_task_arithmetic(ta[k].float(), [tb[k], tc[k]], [0.6, 0.6], 1.0, False)
        assert got[k].dtype == torch.float32, k
        if mode:
            assert torch.equal(got[k], want), k
        else:
            assert (got[k] - want).abs().max() <= 1e-5 * want.abs().max(), k


def mergekit_arcee_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """mergekit 0.1.5's arcee_fusion in its order and dtypes: importance |model − base|·KL(softmax) in the
    inputs' dtype, a sorted-quantile threshold median + 1.5·IQR, and an fp32 mask, so half-precision inputs come
    back as base + (model − base)·mask in fp32."""
    p = torch.nn.functional.softmax(model, dim=-1) + 1e-8
    q = torch.nn.functional.softmax(base, dim=-1) + 1e-8
    importance = (model - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ordered = torch.sort(importance.reshape(-1)).values
    q1, med, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    mask = (importance >= med + 1.5 * (q3 - q1)).float()
    return base + (model - base) * mask


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_arcee_fusion_bits(dtype):
    """The result is mergekit's to the bit, in mergekit's dtype: fp32 for half-precision inputs."""
    base, (model,) = inputs(dtype, 1)
    model = torch.where(
        torch.rand(base.shape) < 0.3, (base.float() + torch.randn(base.shape)).to(dtype), model
    )
    got = get_method("arcee_fusion").fn([model.clone()], base.clone(), rng=torch.Generator())
    want = mergekit_arcee_fusion(base, model)
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
    assert 0 < int((got != base.float()).sum()) < base.numel()  # the threshold keeps some, not all


@pytest.mark.parametrize("method", ["arcee_fusion", "ramplus_tl", "ram"])
def test_half_precision_result_dtype_follows_mergekit(tmp_path, method):
    """`dtype: bfloat16` with arcee_fusion or ramplus_tl: mergekit's kernels return fp32 and it writes them so
    (its config.json still says bfloat16). `compute_dtype: mergekit` writes the same fp32 tensors, equal to
    mergekit's formula; the default mode writes bf16, as `dtype` says; ram returns bf16 in both."""
    seeds = torch.randint(0, 2**31, (3,)).tolist()
    m = [write_model(tmp_path / f"m{i}", s) for i, s in enumerate(seeds)]
    cfg = {
        "merge_method": method,
        "base_model": str(m[0]),
        "models": [{"model": str(p)} for p in m[: 2 if method == "arcee_fusion" else 3]],
        "dtype": "bfloat16",
    }
    exact = load_tensors(moekit.merge(cfg | {"compute_dtype": "mergekit"}, tmp_path / "exact"))
    default = load_tensors(moekit.merge(cfg, tmp_path / "default"))
    lifted = method != "ram"
    t = [{k: v.bfloat16() for k, v in load_tensors(p).items()} for p in m]
    for k in exact:
        assert exact[k].dtype == (torch.float32 if lifted else torch.bfloat16), k
        assert default[k].dtype == torch.bfloat16, k
        if method == "arcee_fusion":
            assert torch.equal(exact[k], mergekit_arcee_fusion(t[0][k], t[1][k])), k
