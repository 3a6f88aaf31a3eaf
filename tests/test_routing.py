"""Router math against independent formulas: per-token Python loops and transformers' own routers."""

import math

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moekit.errors import UserError
from moekit.runtime import routing

TOKENS, EXPERTS = 37, 8


def _logits(seed: int, tokens: int = TOKENS, experts: int = EXPERTS) -> torch.Tensor:
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * 2


def _as_sets(r: routing.Routing) -> list[dict[int, float]]:
    """Per token {expert: weight}; order-free so that tie-free top-k results compare exactly."""
    return [dict(zip(i.tolist(), w.tolist())) for i, w in zip(r.indices, r.weights)]


def _loop_softmax_topk(logits, k, renorm):
    out = []
    for row in logits.tolist():
        exps = [math.exp(v) for v in row]
        probs = [e / sum(exps) for e in exps]
        best = sorted(range(len(row)), key=lambda e: -probs[e])[:k]
        total = sum(probs[e] for e in best) if renorm else 1.0
        out.append({e: probs[e] / total for e in best})
    return out


def _assert_same(got: list[dict[int, float]], expected: list[dict[int, float]], tol=1e-6):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert set(g) == set(e)
        for key in g:
            assert g[key] == pytest.approx(e[key], rel=tol, abs=tol)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_softmax_topk_renorm_matches_loop(k):
    logits = _logits(k)
    _assert_same(
        _as_sets(routing.SoftmaxTopKRenorm.choose(logits, k)), _loop_softmax_topk(logits, k, renorm=True)
    )


@pytest.mark.parametrize("k", [1, 2, 4])
def test_softmax_topk_without_renorm_matches_loop(k):
    logits = _logits(10 + k)
    _assert_same(_as_sets(routing.SoftmaxTopK.choose(logits, k)), _loop_softmax_topk(logits, k, renorm=False))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_softmax_matches_loop(k):
    logits = _logits(20 + k)
    expected = []
    for row in logits.tolist():
        best = sorted(range(len(row)), key=lambda e: -row[e])[:k]
        z = sum(math.exp(row[e]) for e in best)
        expected.append({e: math.exp(row[e]) / z for e in best})
    _assert_same(_as_sets(routing.TopKSoftmax.choose(logits, k)), expected)


@pytest.mark.parametrize("num_groups,groups_per_token,normalize", [(1, 1, True), (4, 2, True), (2, 1, False)])
def test_sigmoid_bias_topk_matches_transformers_deepseek_v3(num_groups, groups_per_token, normalize):
    hidden = 16
    config = DeepseekV3Config(
        hidden_size=hidden,
        n_routed_experts=EXPERTS,
        num_experts_per_tok=2,
        n_group=num_groups,
        topk_group=groups_per_token,
        norm_topk_prob=normalize,
        routed_scaling_factor=2.5,
    )
    router = DeepseekV3TopkRouter(config)
    gen = torch.Generator().manual_seed(num_groups)
    with torch.no_grad():
        router.weight.normal_(generator=gen)
        router.e_score_correction_bias.normal_(generator=gen)
    x = torch.randn(TOKENS, hidden, generator=gen)
    logits, expected_weights, expected_indices = router(x)
    got = routing.SigmoidBiasTopK.choose(
        logits,
        2,
        router.e_score_correction_bias,
        num_groups=num_groups,
        groups_per_token=groups_per_token,
        normalize=normalize,
        scaling_factor=2.5,
    )
    _assert_same(_as_sets(got), _as_sets(routing.Routing(expected_weights, expected_indices)), tol=1e-6)
    # The module: its options kept for `select`, its gate and selection bias as DeepSeek-V3's weights.
    options = {"num_groups": num_groups, "groups_per_token": groups_per_token, "normalize": normalize}
    module = routing.SigmoidBiasTopK(hidden, EXPERTS, 2, scaling_factor=2.5, **options)
    with torch.no_grad():
        module.weight.copy_(router.weight)
        module.selection_bias.copy_(router.e_score_correction_bias)
    selected = module.select(module(x))
    _assert_same(_as_sets(selected), _as_sets(routing.Routing(expected_weights, expected_indices)), tol=1e-6)
    with pytest.raises(TypeError, match="num_group"):
        routing.SigmoidBiasTopK(hidden, EXPERTS, 2, num_group=2)


def test_sigmoid_bias_changes_choice_not_weights():
    logits = _logits(3)
    bias = torch.zeros(EXPERTS)
    bias[5] = 100.0  # expert 5 is always chosen, but its weight stays its own sigmoid score
    got = routing.SigmoidBiasTopK.choose(logits, 2, bias, normalize=False)
    assert (got.indices == 5).any(dim=-1).all()
    slot = (got.indices == 5).int().argmax(dim=-1)
    torch.testing.assert_close(got.weights.gather(1, slot[:, None])[:, 0], torch.sigmoid(logits[:, 5]))


def test_route_rejects_unknown_router_with_suggestion():
    with pytest.raises(UserError, match="did you mean 'softmax_topk'"):
        routing.route(_logits(0), 2, "softmax_topq")
    with pytest.raises(UserError, match="top_k=9"):
        routing.route(_logits(0), 9)


def test_jitter_scales_within_bounds():
    x = torch.randn(64, 32).abs() + 0.1
    y = routing.jitter(x, 0.1, generator=torch.Generator().manual_seed(0))
    ratio = y / x
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6
    assert ratio.std() > 0.03  # actually random: U(0.9, 1.1) has std 0.058
    assert routing.jitter(x, 0.0) is x


def test_load_balancing_loss_matches_formula_and_transformers():
    logits = _logits(7)
    r = routing.SoftmaxTopKRenorm.choose(logits, 2)
    probs = torch.softmax(logits, -1)
    fraction = torch.tensor([(r.indices == e).sum().item() / TOKENS for e in range(EXPERTS)])
    expected = EXPERTS * (fraction * probs.mean(0)).sum()
    got = routing.load_balancing_loss(logits, r.indices)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(got, load_balancing_loss_func((logits,), EXPERTS, 2), rtol=1e-6, atol=0)


def test_load_balancing_loss_mask_and_balance():
    logits = _logits(8)
    r = routing.SoftmaxTopKRenorm.choose(logits, 2)
    mask = torch.rand(TOKENS, generator=torch.Generator().manual_seed(1)) > 0.3
    masked = routing.load_balancing_loss(logits, r.indices, token_mask=mask)
    torch.testing.assert_close(masked, routing.load_balancing_loss(logits[mask], r.indices[mask]))
    # Perfect balance: uniform probabilities and equal counts give exactly k.
    balanced = torch.arange(EXPERTS * 2).reshape(EXPERTS, 2) % EXPERTS
    assert routing.load_balancing_loss(torch.zeros(EXPERTS, EXPERTS), balanced).item() == pytest.approx(2.0)


def test_load_balancing_loss_gradient_flows_to_logits():
    logits = _logits(9).requires_grad_()
    r = routing.SoftmaxTopKRenorm.choose(logits, 2)
    routing.load_balancing_loss(logits, r.indices).backward()
    assert logits.grad.abs().sum() > 0


def test_router_z_loss_matches_formula():
    logits = _logits(11).double()
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / TOKENS
    assert routing.router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def _loop_capacity(indices: torch.Tensor, weights: torch.Tensor, capacity: int, experts: int):
    """First choices of all tokens, then second choices, each in token order, each expert up to capacity."""
    used = [0] * experts
    kept_idx, kept_w = indices.clone(), weights.clone()
    for slot in range(indices.shape[1]):
        for t in range(indices.shape[0]):
            e = int(indices[t, slot])
            if used[e] < capacity:
                used[e] += 1
            else:
                kept_idx[t, slot], kept_w[t, slot] = experts, 0.0
    return kept_idx, kept_w


@pytest.mark.parametrize("factor,k", [(0.5, 2), (1.0, 2), (1.25, 1), (0.75, 4)])
def test_capacity_drops_like_priority_loop(factor, k):
    # Skewed logits so that some experts overflow.
    logits = _logits(30 + k) + torch.linspace(0, 3, EXPERTS)
    r = routing.SoftmaxTopKRenorm.choose(logits, k)
    capacity = routing.expert_capacity(TOKENS, k, EXPERTS, factor)
    assert capacity == math.ceil(factor * TOKENS * k / EXPERTS)
    got = routing.drop_over_capacity(r, EXPERTS, factor)
    exp_idx, exp_w = _loop_capacity(r.indices, r.weights, capacity, EXPERTS)
    torch.testing.assert_close(got.indices, exp_idx)
    torch.testing.assert_close(got.weights, exp_w)
    counts = torch.bincount(got.indices.reshape(-1), minlength=EXPERTS + 1)[:EXPERTS]
    assert counts.max() <= capacity
    if factor < 1:
        assert (got.indices == EXPERTS).any()


def test_capacity_none_is_dropless_and_bad_factor_is_user_error():
    r = routing.SoftmaxTopKRenorm.choose(_logits(5), 2)
    assert routing.drop_over_capacity(r, EXPERTS, None) is r
    with pytest.raises(UserError, match="capacity_factor"):
        routing.drop_over_capacity(r, EXPERTS, 0.0)
