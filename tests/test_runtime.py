"""moe_forward (torch backend) and MoELayer against transformers' `eager` experts and MoE blocks.

Tolerances are relative to each tensor's scale: max |got - expected| <= tol * max |expected|, with
tol = 1e-5 in fp32 and 2e-2 in bf16 (eager rounds every product to bf16, moekit accumulates in fp32).
"""

import subprocess
import sys
import types
import warnings

import pytest
import torch
from transformers import MixtralConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

from moekit import MoELayer, moe_forward
from moekit.errors import UserError
from moekit.runtime import hf, routing, torch_backend
from moekit.runtime.backends import choose_backend

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def assert_close_scaled(got: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    err = (got.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


def mixtral_experts(num_experts=8, hidden=32, inter=48, seed=0) -> MixtralExperts:
    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts)
    return _randomised(MixtralExperts(config), seed)


def qwen2_moe_experts(num_experts=12, hidden=24, inter=16, seed=0) -> Qwen2MoeExperts:
    config = Qwen2MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts)
    return _randomised(Qwen2MoeExperts(config), seed)


def _randomised(experts, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) * 0.3)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) * 0.3)
    experts.config._experts_implementation = "eager"
    return experts


def random_routing(tokens, num_experts, k, seed, router, allowed=None):
    """Router-like weights and ids; `allowed` restricts the experts that can be picked (the rest get none)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=gen) * 2
    if allowed is not None:
        mask = torch.full((num_experts,), float("-inf"))
        mask[allowed] = 0
        logits = logits + mask
    return router(logits, k)


def run_both(experts, hidden, routing_result, dtype):
    """Forward and backward of eager and moekit on copies of the same inputs; returns (eager, moekit) dicts."""
    results = []
    cotangent = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for implementation in ("eager", "moekit"):
        module = experts.to(dtype)
        module.zero_grad(set_to_none=True)
        x = hidden.to(dtype).clone().requires_grad_()
        w = routing_result.weights.clone().requires_grad_()
        if implementation == "eager":
            module.config._experts_implementation = "eager"
            out = module(x, routing_result.indices, w)
        else:
            out = moe_forward(
                x, routing_result.indices, w, module.gate_up_proj, module.down_proj, backend="torch"
            )
        (out.float() * cotangent.float()).sum().backward()
        results.append(
            {
                "out": out.detach(),
                "x": x.grad,
                "w": w.grad,
                "gate_up": module.gate_up_proj.grad.clone(),
                "down": module.down_proj.grad.clone(),
            }
        )
    return results


CASES = [
    ("mixtral", mixtral_experts, routing.SoftmaxTopKRenorm.choose),
    ("qwen2_moe", qwen2_moe_experts, routing.SoftmaxTopK.choose),  # norm_topk_prob=False, Qwen2-MoE's default
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("tokens", [1, 29])
@pytest.mark.parametrize("name,make_experts,router", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_match_eager(name, make_experts, router, tokens, k, dtype):
    experts = make_experts(seed=k)
    num_experts, _, hidden_size = experts.gate_up_proj.shape
    hidden = torch.randn(tokens, hidden_size, generator=torch.Generator().manual_seed(tokens + k))
    r = random_routing(tokens, num_experts, k, seed=tokens * 10 + k, router=router)
    eager, ours = run_both(experts, hidden, r, dtype)
    assert ours["out"].dtype == dtype and ours["gate_up"].dtype == dtype
    for key in eager:
        assert_close_scaled(ours[key], eager[key], TOL[dtype], f"{name} {key}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_experts_without_tokens_get_zero_gradient(dtype):
    experts = mixtral_experts(seed=3)
    hidden = torch.randn(17, 32, generator=torch.Generator().manual_seed(2))
    r = random_routing(17, 8, 2, seed=4, router=routing.SoftmaxTopKRenorm.choose, allowed=[0, 2, 5])
    eager, ours = run_both(experts, hidden, r, dtype)
    for key in eager:
        assert_close_scaled(ours[key], eager[key], TOL[dtype], key)
    idle = [1, 3, 4, 6, 7]
    assert ours["gate_up"][idle].abs().sum() == 0 and ours["down"][idle].abs().sum() == 0
    assert ours["gate_up"][[0, 2, 5]].abs().sum() > 0


def test_dropped_assignments_match_eager_sentinel():
    """Capacity-dropped ids (== E) are skipped by moekit, as by eager's extra one-hot column."""
    experts = mixtral_experts(seed=5)
    hidden = torch.randn(40, 32, generator=torch.Generator().manual_seed(5))
    r = random_routing(40, 8, 2, seed=6, router=routing.SoftmaxTopKRenorm.choose)
    dropped = routing.drop_over_capacity(r, 8, capacity_factor=0.5)
    assert (dropped.indices == 8).sum() > 0
    eager, ours = run_both(experts, hidden, dropped, torch.float32)
    for key in ("out", "x", "gate_up", "down"):
        assert_close_scaled(ours[key], eager[key], 1e-5, key)


@pytest.mark.parametrize("k", [1, 3])
def test_gradcheck_float64(k):
    gen = torch.Generator().manual_seed(k)
    tokens, hidden, inter, num_experts = 6, 4, 3, 5
    x = torch.randn(tokens, hidden, dtype=torch.float64, generator=gen, requires_grad=True)
    r = random_routing(
        tokens, num_experts, k, seed=k, router=routing.SoftmaxTopKRenorm.choose, allowed=[0, 1, 3, 4]
    )
    w = r.weights.double().requires_grad_()
    gate_up = torch.randn(
        num_experts, 2 * inter, hidden, dtype=torch.float64, generator=gen, requires_grad=True
    )
    down = torch.randn(num_experts, hidden, inter, dtype=torch.float64, generator=gen, requires_grad=True)

    def experts(x, w, gate_up, down):
        return moe_forward(x, r.indices, w, gate_up, down, backend="torch")

    assert torch.autograd.gradcheck(experts, (x, w, gate_up, down))


def inference_and_eager(experts, hidden, indices, weights, eager_routing=None):
    """(moe_forward with the torch backend, transformers eager) without autograd; eager gets the same routing
    unless `eager_routing` (indices, weights) is given."""
    with torch.no_grad():
        out = moe_forward(hidden, indices, weights, experts.gate_up_proj, experts.down_proj, backend="torch")
        expected = experts(hidden, *(eager_routing or (indices, weights)))
    return out, expected


@pytest.mark.parametrize("tokens,grouped", [(1, True), (12, True), (150, False)])
def test_bf16_inference_matches_eager(tokens, grouped):
    """Inference on bf16 models: few rows per expert take the bf16 grouped-GEMM path, more take the fp32 loop."""
    experts = mixtral_experts(seed=tokens).to(torch.bfloat16)
    hidden = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    r = random_routing(
        tokens, 8, 2, seed=tokens, router=routing.SoftmaxTopKRenorm.choose, allowed=[0, 1, 2, 4, 6]
    )
    rows = torch_backend.sort_by_expert(r.indices, 8)
    small = torch_backend._small_low_precision_batch(hidden, experts.gate_up_proj, experts.down_proj, rows)
    assert small == grouped
    out, expected = inference_and_eager(experts, hidden, r.indices, r.weights)
    assert out.dtype == torch.bfloat16
    assert_close_scaled(out, expected, 2e-2)


@pytest.mark.parametrize("inter", [6, 12])
def test_bf16_sizes_grouped_mm_refuses_take_another_path(inter):
    """torch._grouped_mm needs 16-byte rows: I = 6 (12 bytes), or I = 12 (2I fits, I does not), must still run."""
    experts = mixtral_experts(inter=inter, seed=inter).to(torch.bfloat16)
    hidden = torch.randn(12, 32, generator=torch.Generator().manual_seed(inter)).to(torch.bfloat16)
    r = random_routing(12, 8, 2, seed=inter, router=routing.SoftmaxTopKRenorm.choose)
    rows = torch_backend.sort_by_expert(r.indices, 8)
    assert not torch_backend._small_low_precision_batch(hidden, experts.gate_up_proj, experts.down_proj, rows)
    out, expected = inference_and_eager(experts, hidden, r.indices, r.weights)
    assert_close_scaled(out, expected, 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inference_with_many_rows_per_expert_matches_eager(dtype):
    """Hundreds of rows per expert take the per-expert-block path, whose row counts are padded to a multiple of
    8; some experts get no tokens."""
    seed, tokens = int(torch.randint(0, 2**31, ())), 700
    while True:  # a routing that exercises the padding: every count a multiple of 8 comes once in ~500 seeds
        r = random_routing(
            tokens, 8, 2, seed=seed, router=routing.SoftmaxTopKRenorm.choose, allowed=[0, 2, 3, 5]
        )
        rows = torch_backend.sort_by_expert(r.indices, 8)
        counts = [b - a for a, b in zip(rows.bounds, rows.bounds[1:])]
        if any(n % torch_backend._COLUMN_MULTIPLE for n in counts):
            break
        seed += 1
    assert torch_backend._rows_per_hit_expert(rows) >= torch_backend._PER_EXPERT_ROWS
    experts = mixtral_experts(seed=seed % 1000).to(dtype)
    hidden = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out, expected = inference_and_eager(experts, hidden, r.indices, r.weights)
    assert out.dtype == dtype
    assert_close_scaled(out, expected, TOL[dtype], f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,k", [(1, 1), (1, 2), (2, 2), (1, 4)])
def test_decode_rows_match_eager(tokens, k, dtype):
    """A token or two (the unsorted decode path), including a dropped assignment (-1) that must add nothing."""
    seed = int(torch.randint(0, 2**31, ()))
    experts = mixtral_experts(seed=seed % 1000).to(dtype)
    hidden = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)
    r = random_routing(tokens, 8, k, seed=seed, router=routing.SoftmaxTopKRenorm.choose)
    assert r.indices.numel() <= torch_backend._DECODE_ROWS
    out, expected = inference_and_eager(experts, hidden, r.indices, r.weights)
    assert out.dtype == dtype
    assert_close_scaled(out, expected, TOL[dtype], f"seed {seed}")
    dropped = r.indices.clone()
    dropped[0, -1] = -1
    kept = r.weights.clone()
    kept[0, -1] = 0  # eager has no sentinel: a zero weight on any expert adds the same nothing
    out, expected = inference_and_eager(experts, hidden, dropped, r.weights, eager_routing=(r.indices, kept))
    assert_close_scaled(out, expected, TOL[dtype], f"seed {seed}, dropped")


def test_bf16_weights_with_fp32_activations():
    """Mixed dtypes (fp32 activations, bf16 weights) compute in fp32 and return fp32."""
    experts = mixtral_experts(seed=7).to(torch.bfloat16)
    hidden = torch.randn(9, 32, generator=torch.Generator().manual_seed(7))
    r = random_routing(9, 8, 2, seed=7, router=routing.SoftmaxTopKRenorm.choose)
    out = moe_forward(hidden, r.indices, r.weights, experts.gate_up_proj, experts.down_proj, backend="torch")
    assert out.dtype == torch.float32
    expected = moe_forward(
        hidden, r.indices, r.weights, experts.gate_up_proj.float(), experts.down_proj.float(), backend="torch"
    )
    assert_close_scaled(out, expected, 1e-5)


def test_moe_forward_from_logits_and_leading_dims():
    experts = mixtral_experts(seed=8)
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(8))
    logits = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(9))
    out = moe_forward(hidden, logits, None, experts.gate_up_proj, experts.down_proj, top_k=2)
    r = routing.SoftmaxTopKRenorm.choose(logits.reshape(10, 8), 2)
    expected = experts(hidden.reshape(10, 32), r.indices, r.weights).reshape(2, 5, 32)
    assert out.shape == (2, 5, 32)
    assert_close_scaled(out, expected, 1e-5)


def test_moe_forward_user_errors():
    experts = mixtral_experts()
    x, idx, w = torch.randn(3, 32), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
    with pytest.raises(UserError, match="down_proj"):
        moe_forward(x, idx, w, experts.gate_up_proj, experts.down_proj[:, :, :5])
    with pytest.raises(UserError, match="hidden size 7"):
        moe_forward(torch.randn(3, 7), idx, w, experts.gate_up_proj, experts.down_proj)
    with pytest.raises(UserError, match="top_k"):
        moe_forward(x, torch.randn(3, 8), None, experts.gate_up_proj, experts.down_proj)
    with pytest.raises(UserError, match="did you mean 'torch'"):
        moe_forward(x, idx, w, experts.gate_up_proj, experts.down_proj, backend="torh")


def test_auto_backend_on_cpu_is_torch():
    assert choose_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("router_name", ["softmax_topk_renorm", "softmax_topk"])
def test_moe_layer_matches_transformers_block(router_name):
    """MoELayer with copied weights equals transformers' Mixtral block (renorm) or its Qwen2 router (no renorm)."""
    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config)
    layer = MoELayer.build(32, 48, 8, 2, router=router_name, backend="torch")
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(layer.experts.gate_up_proj)
        block.experts.down_proj.copy_(layer.experts.down_proj)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(11))
    result = layer(x)
    if router_name == "softmax_topk_renorm":
        expected = block(x)
    else:
        r = routing.SoftmaxTopK.choose(x.reshape(-1, 32) @ layer.router.weight.t(), 2)
        expected = block.experts(x.reshape(-1, 32), r.indices, r.weights).reshape(x.shape)
    assert_close_scaled(result.hidden, expected, 1e-5)
    logits = x.reshape(-1, 32) @ layer.router.weight.t()
    assert_close_scaled(result.router_logits, logits, 1e-6)
    r = routing.route(logits, 2, router_name)
    torch.testing.assert_close(result.load_balancing_loss, routing.load_balancing_loss(logits, r.indices))
    torch.testing.assert_close(result.z_loss, routing.router_z_loss(logits))

    # Gradients reach the router through the routing weights, as in the transformers block.
    (result.hidden.sum() + 0.01 * result.load_balancing_loss + 0.001 * result.z_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0 and layer.experts.gate_up_proj.grad.abs().sum() > 0
    if router_name == "softmax_topk_renorm":
        block_logits = x.reshape(-1, 32) @ block.gate.weight.t()
        block_loss = 0.01 * routing.load_balancing_loss(block_logits, r.indices)
        (block(x).sum() + block_loss + 0.001 * routing.router_z_loss(block_logits)).backward()
        assert_close_scaled(layer.router.weight.grad, block.gate.weight.grad, 1e-5, "router grad")


def test_moe_layer_capacity_sigmoid_and_user_errors():
    layer = MoELayer.build(16, 8, 4, 2, router="sigmoid_bias_topk", capacity_factor=0.5, backend="torch")
    layer.router.selection_bias[3] = (
        10.0  # every token picks expert 3; capacity lets only ceil(0.5 * 2 * 12 / 4) = 3 in
    )
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(12))
    result = layer(x)
    logits = x @ layer.router.weight.t()
    kept = routing.drop_over_capacity(
        routing.SigmoidBiasTopK.choose(logits, 2, layer.router.selection_bias), 4, 0.5
    )
    assert (kept.indices == 3).sum() == 3
    expected = moe_forward(
        x, kept.indices, kept.weights, layer.experts.gate_up_proj, layer.experts.down_proj, backend="torch"
    )
    assert_close_scaled(result.hidden, expected, 1e-6)
    with pytest.raises(UserError, match="did you mean"):
        MoELayer.build(16, 8, 4, 2, router="softmax_top_k")
    with pytest.raises(UserError, match="top_k=5"):
        MoELayer.build(16, 8, 4, 5)


def test_hf_experts_function_runs_gelu_and_names_what_it_does_not_run():
    config = MixtralConfig(hidden_size=16, intermediate_size=8, num_local_experts=4, hidden_act="gelu")
    experts = _randomised(MixtralExperts(config), 0)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    r = random_routing(5, 4, 2, seed=0, router=routing.SoftmaxTopKRenorm.choose)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent (or warned) fallback: moekit runs GELU itself
        out = hf.moekit_experts_forward(experts, x, r.indices, r.weights)
    assert_close_scaled(out, experts(x, r.indices, r.weights), 1e-6)

    experts.act_fn = torch.nn.PReLU()  # a learned activation: outside what moekit runs
    with pytest.raises(hf.UnsupportedExperts, match="activation PReLU.*moekit_or_grouped_mm"):
        hf.moekit_experts_forward(experts, x, r.indices, r.weights)
    with pytest.warns(UserWarning, match="PReLU.*grouped_mm, as asked"):
        out = hf.moekit_or_grouped_mm_forward(experts, x, r.indices, r.weights)
    assert_close_scaled(out, experts(x, r.indices, r.weights), 1e-6)


def test_registration_is_idempotent_and_tolerates_old_transformers(monkeypatch):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    assert hf.register_with_transformers() is True
    assert hf.register_with_transformers() is True
    assert ALL_EXPERTS_FUNCTIONS["moekit"] is hf.moekit_experts_forward
    assert list(ExpertsInterface._global_mapping).count("moekit") == 1
    # transformers 4.x: the module exists but has no ExpertsInterface.
    monkeypatch.setitem(sys.modules, "transformers.integrations.moe", types.ModuleType("moe"))
    assert hf.register_with_transformers() is False


@pytest.mark.slow
def test_import_moekit_registers_lazily():
    """`import moekit` does not import transformers, yet loading transformers' MoE module registers moekit."""
    code = (
        "import sys, moekit\n"
        "assert 'transformers' not in sys.modules and 'triton' not in sys.modules\n"
        "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS\n"
        "assert 'moekit' in ALL_EXPERTS_FUNCTIONS\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
