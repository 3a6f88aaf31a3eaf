"""Whole transformers models with experts_implementation="moekit" against the same files loaded with "eager".

Tiny random models are built from a config, saved with save_pretrained (per-expert legacy names on disk) and
loaded back, so the test also covers transformers' conversion into fused experts. The Qwen models use GELU
experts, as transformers' own test configs do, which moekit runs itself (no fallback). Tolerance: max |Δ| <= 1e-5
times the tensor's max |value| in fp32, for logits and for every parameter's gradient.
"""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import moekit  # noqa: F401  (registers experts_implementation="moekit")
from moekit.runtime import hf

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
)
MODELS = {
    "mixtral": (MixtralForCausalLM, MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4)),
    "qwen2_moe": (
        Qwen2MoeForCausalLM,
        Qwen2MoeConfig(
            **COMMON,
            intermediate_size=40,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=6,
            norm_topk_prob=False,
            hidden_act="gelu",  # as in transformers' own Qwen2-MoE test config
        ),
    ),
    "qwen3_moe": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig(
            **COMMON,
            intermediate_size=40,
            moe_intermediate_size=24,
            num_experts=6,
            head_dim=8,
            hidden_act="gelu",
        ),
    ),
}


def assert_close_scaled(got, expected, tol, what=""):
    err = (got.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


@pytest.fixture(scope="module", params=list(MODELS))
def saved_model(request, tmp_path_factory):
    model_class, config = MODELS[request.param]
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():  # transformers' init is tiny for experts; larger weights make routing matter
        for name, param in model.named_parameters():
            if "experts" in name or "gate" in name:
                param.normal_(0, 0.3)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, path


def load(path, implementation):
    model = AutoModelForCausalLM.from_pretrained(
        path, experts_implementation=implementation, dtype=torch.float32
    )
    assert model.config._experts_implementation == implementation
    return model


def test_logits_and_greedy_tokens_match_eager(saved_model):
    name, path = saved_model
    eager, ours = load(path, "eager").eval(), load(path, "moekit").eval()
    input_ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    calls = []
    original = hf.moekit_experts_forward

    def spy(self, *args):
        calls.append(type(self).__name__)
        return original(self, *args)

    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register("moekit", spy)
    try:
        with torch.no_grad():
            assert_close_scaled(ours(input_ids).logits, eager(input_ids).logits, 1e-5, f"{name} logits")
        assert len(calls) == 2  # one call per MoE layer: moekit really ran
        generate = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        tokens_ours = ours.generate(input_ids, **generate)
        tokens_eager = eager.generate(input_ids, **generate)
    finally:
        ExpertsInterface.register("moekit", original)  # put the real function back
    assert torch.equal(tokens_ours, tokens_eager)


def test_training_step_gradients_match_eager(saved_model):
    name, path = saved_model
    input_ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    grads = []
    for implementation in ("eager", "moekit"):
        model = load(path, implementation).train()
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("experts" in n for n in grads[1])
    for key in grads[0]:
        assert_close_scaled(grads[1][key], grads[0][key], 1e-5, f"{name} {key}")
