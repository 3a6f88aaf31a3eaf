"""The papers' routers and balancing against independent loop implementations of their formulas.

Tolerances: exact (ids, counts, signs) or 1e-6 relative for float results in float32 / float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from moekit import MoELayer, moe_forward
from moekit.errors import UserError
from moekit.runtime import balancing, routing


def test_expert_choice_matches_per_expert_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(13, 4, generator=gen)
    r = routing.route(logits, 2, "expert_choice", capacity_factor=1.0)
    capacity = math.ceil(13 * 2 / 4)
    probs = torch.softmax(logits, -1)
    want_w, want_i = torch.zeros(13, 4), torch.full((13, 4), 4)
    for e in range(4):  # each expert: its `capacity` highest-scoring tokens
        ranked = sorted(range(13), key=lambda t: -probs[t, e].item())[:capacity]
        for t in ranked:
            want_w[t, e], want_i[t, e] = probs[t, e], e
    assert torch.equal(r.indices, want_i)
    torch.testing.assert_close(r.weights, want_w)
    assert (r.indices < 4).sum(0).tolist() == [capacity] * 4  # perfectly balanced by construction


def test_expert_choice_runs_in_moe_layer_and_moe_forward():
    layer = MoELayer.build(8, 6, 4, 2, router="expert_choice", backend="torch")
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    r = routing.route(layer.router(x), 2, "expert_choice")
    want = moe_forward(
        x, r.indices, r.weights, layer.experts.gate_up_proj, layer.experts.down_proj, backend="torch"
    )
    torch.testing.assert_close(out.hidden, want)
    with pytest.raises(UserError, match="capacity_factor"):
        routing.ExpertChoice.choose(torch.randn(3, 4), 1, capacity_factor=0)


def test_noisy_top_k_load_probability_matches_loop_formula():
    gen = torch.Generator().manual_seed(2)
    clean, noisy = (
        torch.randn(6, 5, generator=gen, dtype=torch.float64),
        torch.randn(6, 5, generator=gen, dtype=torch.float64),
    )
    std = torch.rand(6, 5, generator=gen, dtype=torch.float64) + 0.1
    k = 2
    got = balancing.load_probability(clean, std, noisy, k)
    for t in range(6):
        for i in range(5):
            others = sorted((noisy[t, j].item() for j in range(5) if j != i), reverse=True)
            kth_excluding = others[k - 1]
            z = (clean[t, i].item() - kth_excluding) / std[t, i].item()
            assert got[t, i].item() == pytest.approx(0.5 * (1 + math.erf(z / math.sqrt(2))), rel=1e-9)


def test_noisy_top_k_gate_routing_and_losses():
    gate = balancing.NoisyTopKGate(8, 5, 2)
    with torch.no_grad():
        gate.weight.normal_(generator=torch.Generator().manual_seed(3))
        gate.noise_weight.normal_(generator=torch.Generator().manual_seed(4))
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(5))
    gate.eval()
    r, clean, std, noisy = gate(x)
    top, idx = (x @ gate.weight.T).topk(2, dim=-1)
    assert torch.equal(r.indices, idx) and std is None
    torch.testing.assert_close(r.weights, torch.softmax(top, -1))
    gate.train()
    r, clean, std, noisy = gate(x, generator=torch.Generator().manual_seed(6))
    importance, load = gate.losses(r, clean, std, noisy)
    gates = torch.zeros(20, 5)
    for t in range(20):
        for j in range(2):
            gates[t, r.indices[t, j]] = r.weights[t, j]
    imp = gates.sum(0)
    assert importance.item() == pytest.approx((imp.var() / imp.mean() ** 2).item(), rel=1e-5)
    probs = balancing.load_probability(clean, std, noisy, 2).sum(0)
    assert load.item() == pytest.approx((probs.var() / probs.mean() ** 2).item(), rel=1e-5)
    (importance + load).backward()  # both losses train the gate
    assert gate.weight.grad.abs().sum() > 0 and gate.noise_weight.grad.abs().sum() > 0


def test_sequence_balance_loss_matches_per_sequence_loop():
    gen = torch.Generator().manual_seed(7)
    scores = torch.sigmoid(torch.randn(3 * 5, 4, generator=gen))
    idx = scores.topk(2, dim=-1).indices
    got = balancing.sequence_balance_loss(scores, idx, num_sequences=3)
    total = 0.0
    for b in range(3):
        s, i = scores[b * 5 : (b + 1) * 5], idx[b * 5 : (b + 1) * 5]
        for e in range(4):
            f = 4 / (2 * 5) * sum(int(e in row.tolist()) for row in i)
            p = sum((s[t, e] / s[t].sum()).item() for t in range(5)) / 5
            total += f * p
    assert got.item() == pytest.approx(total / 3, rel=1e-6)
    with pytest.raises(UserError, match="do not split"):
        balancing.sequence_balance_loss(scores, idx, num_sequences=4)


def test_bias_update_and_optimizer_hook():
    bias = torch.zeros(4)
    balancing.update_selection_bias(bias, torch.tensor([5.0, 1.0, 3.0, 3.0]), rate=0.1)
    assert bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])  # sign(mean - load) · rate

    layer = MoELayer.build(8, 6, 4, 2, router="sigmoid_bias_topk", backend="torch")
    tracker = balancing.LoadTracker(layer.router.selection_bias)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    handle = balancing.register_bias_update_hook(optimizer, [tracker], rate=0.01)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(8))
    out = layer(x)
    r = routing.SigmoidBiasTopK.choose(out.router_logits, 2, torch.zeros(4))
    tracker.observe(r.indices)
    load = balancing.expert_load(r.indices, 4)
    out.hidden.sum().backward()
    optimizer.step()
    assert layer.router.selection_bias.tolist() == pytest.approx(
        (0.01 * torch.sign(load.mean() - load)).tolist()
    )
    assert tracker.load.sum() == 0  # forgotten after the update
    handle.remove()


def test_shared_expert_with_sigmoid_gate_matches_qwen2_moe_block():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = Qwen2MoeConfig(
        hidden_size=8, moe_intermediate_size=6, shared_expert_intermediate_size=10, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=False,
    )  # fmt: skip
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    block = Qwen2MoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    layer = MoELayer.build(
        8, 6, 4, 2, router="softmax_topk", shared_expert_size=10, shared_expert_gate=True, backend="torch"
    )
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        layer.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        layer.experts.down_proj.copy_(block.experts.down_proj)
        mlp = block.shared_expert
        layer.shared_expert.gate_up_proj.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        layer.shared_expert.down_proj.copy_(mlp.down_proj.weight)
        layer.shared_expert.gate.weight.copy_(block.shared_expert_gate.weight)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x).hidden, block(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="shared_expert_size"):
        MoELayer.build(8, 6, 4, 2, shared_expert_gate=True)
