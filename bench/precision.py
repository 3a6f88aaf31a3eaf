"""Accuracy: moekit's experts and transformers' eager experts against a float64 reference, in fp32 and bf16.

Two measurements, each against the same computation in float64 (transformers' eager code on float64 copies of
the very weights and inputs tested, bf16-rounded ones included, so only the arithmetic differs):
- one Mixtral experts layer (H=1024, I=3584, E=8, k=2, 256 tokens; the routing is fixed, so only the experts'
  arithmetic differs), the output's max |error| and its mean |error|, and max |error| / max |reference|;
- a tiny random Mixtral (4 layers, H=256; routers included, so bf16 rounding can also change a routing choice),
  the logits' max |error| on 4 x 32 tokens.

With fp32 weights moekit and eager agree to fp32 rounding. With bf16 weights, eager computes in bf16, while
moekit's CPU path computes in fp32 where the CPU has no bf16 units (`runtime/cpu_dtype.py`), so its error is the
bf16 rounding of the inputs and weights only.

    python bench/precision.py
"""

from __future__ import annotations

import torch
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import moekit  # noqa: F401  (registers experts_implementation="moekit")
from moekit.runtime.routing import route


def experts_errors(dtype: torch.dtype) -> dict[str, tuple[float, float, float]]:
    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=1024, intermediate_size=3584, num_local_experts=8, num_experts_per_tok=2
    )
    experts = MixtralExperts(config).requires_grad_(False)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 1024**-0.5)
        experts.down_proj.normal_(0, 3584**-0.5)
    hidden = torch.randn(256, 1024).to(dtype)
    weights, index = route(torch.randn(256, 8), 2)
    weights = weights.to(dtype)
    experts = experts.to(dtype)
    reference_module = MixtralExperts(config).requires_grad_(False).double()
    reference_module.load_state_dict(experts.state_dict())  # the same (rounded) weights, in float64
    reference_module.config._experts_implementation = "eager"
    reference = reference_module(hidden.double(), index, weights.double())
    errors = {}
    for implementation in ("eager", "moekit"):
        experts.config._experts_implementation = implementation
        out = experts(hidden, index, weights).double()
        err = (out - reference).abs()
        errors[implementation] = (
            err.max().item(),
            err.mean().item(),
            err.max().item() / reference.abs().max().item(),
        )
    return errors


def model_errors(dtype: torch.dtype) -> dict[str, float]:
    config = MixtralConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name or "gate" in name:
                param.normal_(0, 0.05)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model = model.to(dtype)
        model.set_experts_implementation("eager")
        reference = model.double()(ids).logits  # the same (rounded) weights, in float64
        model = model.to(dtype)
        errors = {}
        for implementation in ("eager", "moekit"):
            model.set_experts_implementation(implementation)
            errors[implementation] = (model(ids).logits.double() - reference).abs().max().item()
    return errors


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    print("Experts layer (H=1024, I=3584, E=8, k=2, 256 tokens; same routing), error vs float64:")
    print(f"| weights | {'experts':8} | max abs error | mean abs error | max error / max abs ref |")
    print("|---|---|---:|---:|---:|")
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for name, (max_err, mean_err, rel) in experts_errors(dtype).items():
            print(f"| {label} | {name:8} | {max_err:.3g} | {mean_err:.3g} | {rel:.3g} |")
    print("\nTiny Mixtral (4 layers, H=256, E=8, k=2; routers included), logits max abs error vs float64:")
    print("| weights | experts | max abs logit error |")
    print("|---|---|---:|")
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for name, err in model_errors(dtype).items():
            print(f"| {label} | {name} | {err:.3g} |")


if __name__ == "__main__":
    main()
