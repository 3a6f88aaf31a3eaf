"""The lm objective's straight-through routing: the forward pass is the model's own top-k routing, and the
gradient reaching each router logit is the dense mixture's, p * (s - p.s) with s_e = dL/d(MoE output) . expert_e(x).

The reference computes every expert's output from the weights with plain torch (Mixtral's SwiGLU), independent of
the experts backend under test.
"""

from __future__ import annotations

import pytest
import torch

import moekit.transformers_io  # noqa: F401  (registers experts_implementation="moekit")
from moekit.calibrate import _straight_through_routing


def _tiny_mixtral(top_k: int, experts_implementation: str):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=top_k, max_position_embeddings=64,
    )  # fmt: skip
    config._experts_implementation = experts_implementation
    torch.manual_seed(11)
    model = MixtralForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _expert_outputs(experts, x: torch.Tensor) -> torch.Tensor:
    """[E, N, H]: every expert's SwiGLU output on every token, from the fused weights."""
    outs = []
    for e in range(experts.gate_up_proj.shape[0]):
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        outs.append(torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, experts.down_proj[e]))
    return torch.stack(outs)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("backend", ["moekit", "eager"])
def test_router_gradient_is_the_dense_mixtures_and_forward_is_unchanged(top_k, backend):
    model = _tiny_mixtral(top_k, backend)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    probe = torch.randn(2, 9, 61, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(input_ids=ids).logits

    moe = model.model.layers[0].mlp
    seen = {}
    moe.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].reshape(-1, 16).detach()))

    def keep_logits(module, args, output):
        output[0].retain_grad()
        seen["logits"] = output[0]

    def keep_output_grad(module, args, output):
        output.register_hook(lambda g: seen.__setitem__("g", g.reshape(-1, 16)))

    moe.gate.register_forward_hook(keep_logits)
    moe.register_forward_hook(keep_output_grad)
    for p in model.parameters():
        p.requires_grad_(False)
    moe.gate.weight.requires_grad_(True)
    with _straight_through_routing(model):
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)  # the forward routes as at inference
    (logits * probe).sum().backward()

    p = torch.softmax(seen["logits"].detach().float(), dim=-1)
    s = torch.einsum("nh,enh->ne", seen["g"], _expert_outputs(moe.experts, seen["x"]))
    expected = p * (s - (p * s).sum(dim=-1, keepdim=True))
    assert expected.abs().max() > 1e-3  # the unselected experts carry a real signal
    torch.testing.assert_close(seen["logits"].grad, expected, rtol=1e-4, atol=1e-5)
    assert not [
        h for m in model.modules() for h in m._forward_hooks.values() if h.__name__ == "route_through_all"
    ]
