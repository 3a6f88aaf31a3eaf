"""moekit's experts under torch.compile(fullgraph=True) and torch.export, in whole transformers models.

`test_compiled_static_cache_generate_matches_eager` is the essence of transformers' own
`GenerationTesterMixin.test_generate_compile_model_forward_fullgraph`: two different input batches of the same
shape, greedy generation in eager mode with a dynamic cache, then with a static cache, which makes generate
compile the forward with fullgraph=True and dynamic=False; the compiled run must not recompile and must give
the same tokens (scores within 1e-3, transformers' MoE tolerance). Dynamo's "eager" backend keeps the test
fast on 2 cores: graph breaks, guards and recompiles are dynamo's, whatever runs the graph afterwards.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CompileConfig,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import moekit  # noqa: F401  (registers experts_implementation="moekit")
from moekit import moe_forward

COMMON = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
    num_experts_per_tok=2,
    hidden_act="gelu",  # transformers' own test configs use GELU experts
)
MODELS = {
    "mixtral": (
        MixtralForCausalLM,
        lambda: MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4),
    ),
    "qwen2_moe": (
        Qwen2MoeForCausalLM,
        lambda: Qwen2MoeConfig(
            **COMMON,
            intermediate_size=24,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=16,
            num_experts=4,
        ),
    ),
    "qwen3_moe": (
        Qwen3MoeForCausalLM,
        lambda: Qwen3MoeConfig(
            **COMMON, intermediate_size=24, moe_intermediate_size=8, num_experts=4, head_dim=8
        ),
    ),
}


class CompileCounter:
    """Records each graph that dynamo compiles; `backend` runs them as they are. generate deep-copies its
    CompileConfig, so the backend is a plain function (copied by reference) that closes over the record."""

    def __init__(self):
        self.graphs = []

        def backend(graph_module, example_inputs, **options):  # generate passes mode/options
            self.graphs.append(graph_module)
            return graph_module.forward

        self.backend = backend

    @property
    def frame_count(self) -> int:
        return len(self.graphs)


def tiny_model(name: str, implementation: str):
    model_class, make_config = MODELS[name]
    config = make_config()
    config.pad_token_id = 0
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():  # transformers' init is tiny for experts; larger weights make routing matter
        for param_name, param in model.named_parameters():
            if "experts" in param_name or "gate" in param_name:
                param.normal_(0, 0.3)
    model.set_experts_implementation(implementation)
    return model.eval()


def generate_twice(model, cache: str | None, backend=None):
    """Greedy generation for two different batches of the same shape; with a cache implementation."""
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(1, 64, (2, 6), generator=gen) for _ in range(2)]
    kwargs = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)
    if cache:
        config = CompileConfig(fullgraph=True, dynamic=False, backend=backend)
        config._compile_all_devices = True  # compile on the CPU too
        kwargs.update(cache_implementation=cache, compile_config=config)
    return [model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs) for ids in batches]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_static_cache_generate_matches_eager(name):
    model = tiny_model(name, "moekit")
    assert model.config._experts_implementation == "moekit"
    with torch.compiler.set_stance("force_eager"):
        eager = generate_twice(model, None)
    torch.compiler.reset()
    counter = CompileCounter()
    compiled = generate_twice(model, "static", backend=counter.backend)
    assert hasattr(model, "_compiled_call")  # generate really compiled the forward
    # fullgraph=True raises on any graph break. generate compiles the decoding forward (prefill runs eager):
    # one graph, and the second batch adds none, so nothing recompiled.
    assert counter.frame_count == 1, counter.frame_count
    experts_op = (torch.ops.moekit.experts, torch.ops.moekit.experts.default)
    assert any(n.target in experts_op for n in counter.graphs[-1].graph.nodes)  # moekit ran, inside the graph
    for want, got in zip(eager, compiled):
        assert torch.equal(want.sequences, got.sequences)
        for a, b in zip(want.scores, got.scores):
            torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_compiled_generate_recompiles_no_more_than_grouped_mm():
    frames = {}
    for implementation in ("grouped_mm", "moekit"):
        torch.compiler.reset()
        counter = CompileCounter()
        generate_twice(tiny_model("mixtral", implementation), "static", backend=counter.backend)
        frames[implementation] = counter.frame_count
    assert frames["moekit"] <= frames["grouped_mm"], frames


@pytest.mark.slow
def test_torch_export_of_tiny_mixtral_matches_eager():
    model = tiny_model("mixtral", "moekit")
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    exported = torch.export.export(model, (ids,), kwargs={"use_cache": False})
    assert any(n.target is torch.ops.moekit.experts.default for n in exported.graph.nodes)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        got = exported.module()(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_training_step_matches_eager_gradients():
    """The op's autograd formula under AOT autograd (the backward op, recomputing the forward)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 8, generator=gen, requires_grad=True)
    logits = torch.randn(9, 4, generator=gen, requires_grad=True)
    gate_up = (torch.randn(4, 12, 8, generator=gen) * 0.5).requires_grad_()
    down = (torch.randn(4, 8, 6, generator=gen) * 0.5).requires_grad_()
    bias = torch.randn(4, 8, generator=gen, requires_grad=True)

    def loss(x, logits, gate_up, down, bias):
        out = moe_forward(x, logits, None, gate_up, down, top_k=2, down_bias=bias, backend="torch")
        return out.square().sum()

    leaves = (x, logits, gate_up, down, bias)
    want = torch.autograd.grad(loss(*leaves), leaves)
    torch.compiler.reset()
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves), leaves)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
