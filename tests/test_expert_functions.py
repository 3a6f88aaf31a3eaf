"""Experts of every activation, gated or not, with biases or not, against an fp64 reference; forward and backward.

The reference is a per-(token, slot) loop in float64 that takes its activation from transformers' own ACT2FN
(and gpt-oss's clamped GLU from transformers' GptOssExperts), so it shares no code with moekit's activation
table; its gradients come from fp64 autograd. Tolerance: max |Δ| <= tol · max |reference|, with tol 1e-5 for
fp32 and 2e-2 for bf16 weights and activations.
"""

from __future__ import annotations

import pytest
import torch
from moekit.kernels import ops
from transformers import GptOssConfig, NemotronHConfig
from transformers.activations import ACT2FN
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

from moekit import moe_forward
from moekit.errors import UserError
from moekit.runtime import activations, hf, torch_backend
from moekit.runtime.activations import ExpertFunction

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
NAMES = [*activations.ACTIVATIONS, "swigluoai"]
E, H, I, K = 4, 8, 8, 2  # I·2 bytes a multiple of 16: torch._grouped_mm needs it in bf16


def assert_close_scaled(got, expected, tol, what=""):
    err = (got.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


def reference_act(fn: ExpertFunction):
    """The activation from transformers (independent of moekit.runtime.activations), on [n, P] -> [n, I]."""
    if fn.activation == "swigluoai":

        def glu(preact):
            gate, up = preact[..., ::2], preact[..., 1::2]
            if not fn.interleaved:
                gate, up = preact.chunk(2, dim=-1)
            gate, up = gate.clamp(max=fn.limit), up.clamp(-fn.limit, fn.limit)
            return (up + 1) * gate * torch.sigmoid(gate * fn.alpha)

        return glu
    act = ACT2FN[fn.activation]
    if not fn.gated:
        return act

    def gated(preact):
        if fn.interleaved:
            return act(preact[..., ::2]) * preact[..., 1::2]
        gate, up = preact.chunk(2, dim=-1)
        return act(gate) * up

    return gated


def reference(x, idx, w, gate_up, down, gate_up_bias, down_bias, fn):
    """fp64 loop over (token, slot); ids outside [0, E) are skipped."""
    act = reference_act(fn)
    out = torch.zeros(x.shape, dtype=torch.float64)
    rows = []
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if not 0 <= e < gate_up.shape[0]:
                continue
            pre = gate_up[e].double() @ x[t].double()
            if gate_up_bias is not None:
                pre = pre + gate_up_bias[e].double()
            y = down[e].double() @ act(pre)
            if down_bias is not None:
                y = y + down_bias[e].double()
            rows.append((t, w[t, j].double() * y))
    for t, row in rows:
        out[t] += row
    return out


def problem(fn: ExpertFunction, bias: bool, tokens: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    width = 2 * I if fn.gated else I
    x = torch.randn(tokens, H, generator=gen)
    logits = torch.randn(tokens, E, generator=gen)
    weights, idx = torch.softmax(logits, -1).topk(K, dim=-1)
    idx[0, -1] = E  # one dropped assignment
    tensors = {
        "x": x,
        "w": weights,
        "gate_up": torch.randn(E, width, H, generator=gen) * 0.5,
        "down": torch.randn(E, H, I, generator=gen) * 0.5,
        "gate_up_bias": torch.randn(E, width, generator=gen) if bias else None,
        "down_bias": torch.randn(E, H, generator=gen) if bias else None,
    }
    tensors = {k: None if v is None else v.to(dtype) for k, v in tensors.items()}
    return idx, tensors


def run(backend, fn, idx, tensors, grad=True):
    """moekit's output and gradients (fp64 copies) for these inputs."""
    leaves = {k: None if v is None else v.clone().requires_grad_(grad) for k, v in tensors.items()}
    out = moe_forward(
        leaves["x"], idx, leaves["w"], leaves["gate_up"], leaves["down"], backend=backend, expert_fn=fn,
        gate_up_bias=leaves["gate_up_bias"], down_bias=leaves["down_bias"],
    )  # fmt: skip
    result = {"out": out.detach()}
    if grad:
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        (out.double() * cotangent.double()).sum().backward()
        result.update({k: v.grad for k, v in leaves.items() if v is not None})
    return result


def expected(fn, idx, tensors):
    leaves = {k: None if v is None else v.double().requires_grad_() for k, v in tensors.items()}
    out = reference(
        leaves["x"], idx, leaves["w"], leaves["gate_up"], leaves["down"], leaves["gate_up_bias"],
        leaves["down_bias"], fn,
    )  # fmt: skip
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * cotangent.double()).sum().backward()
    return {"out": out.detach(), **{k: v.grad for k, v in leaves.items() if v is not None}}


def functions(names):
    out = []
    for name in names:
        out.append(ExpertFunction(name))
        if name == "swigluoai":
            out.append(ExpertFunction(name, interleaved=True, alpha=1.5, limit=1.0))  # the clamps bite
        else:
            out.append(ExpertFunction(name, gated=False))
    return out


def fn_id(fn):
    return f"{fn.activation}-{'gated' if fn.gated else 'plain'}{'-interleaved' if fn.interleaved else ''}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("fn", functions(NAMES), ids=fn_id)
def test_torch_backend_matches_fp64_reference(fn, bias, dtype):
    idx, tensors = problem(fn, bias, tokens=9, seed=len(fn.activation))
    tensors = {k: None if v is None else v.to(dtype) for k, v in tensors.items()}
    got, want = run("torch", fn, idx, tensors), expected(fn, idx, tensors)
    for key, value in want.items():
        assert_close_scaled(got[key], value, TOL[dtype], f"{fn_id(fn)} {key}")


@pytest.mark.parametrize("tokens,dtype", [(2, torch.float32), (9, torch.bfloat16), (600, torch.float32)])
@pytest.mark.parametrize(
    "fn", [ExpertFunction("gelu"), ExpertFunction("swigluoai", interleaved=True)], ids=fn_id
)
def test_every_inference_path_runs_the_function_and_biases(fn, tokens, dtype):
    """Decode rows (2 tokens), bf16 grouped GEMMs (9 tokens, bf16) and per-expert blocks (600 tokens)."""
    idx, tensors = problem(fn, True, tokens, seed=tokens, dtype=dtype)
    if tokens == 600:
        rows = torch_backend.sort_by_expert(idx, E)
        assert torch_backend._rows_per_hit_expert(rows) >= torch_backend._PER_EXPERT_ROWS
    with torch.no_grad():
        got = run("torch", fn, idx, tensors, grad=False)["out"]
    assert_close_scaled(got, reference(idx=idx, fn=fn, **_positional(tensors)), TOL[dtype], fn_id(fn))


def _positional(t):
    return dict(
        x=t["x"], w=t["w"], gate_up=t["gate_up"], down=t["down"], gate_up_bias=t["gate_up_bias"],
        down_bias=t["down_bias"],
    )  # fmt: skip


def test_transposed_layout_is_a_view():
    fn = ExpertFunction("gelu_pytorch_tanh")
    idx, tensors = problem(fn, True, tokens=7, seed=3)
    want = expected(fn, idx, tensors)
    stored = {
        "gate_up": tensors["gate_up"].transpose(1, 2).contiguous(),
        "down": tensors["down"].transpose(1, 2),
    }
    leaves = {k: v.contiguous().requires_grad_() for k, v in stored.items()}
    out = moe_forward(
        tensors["x"], idx, tensors["w"], leaves["gate_up"].transpose(1, 2), leaves["down"].transpose(1, 2),
        backend="torch", expert_fn=fn, gate_up_bias=tensors["gate_up_bias"], down_bias=tensors["down_bias"],
    )  # fmt: skip
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out.double() * cotangent.double()).sum().backward()
    assert_close_scaled(out, want["out"], 1e-5, "out")
    assert_close_scaled(leaves["gate_up"].grad.transpose(1, 2), want["gate_up"], 1e-5, "gate_up")
    assert_close_scaled(leaves["down"].grad.transpose(1, 2), want["down"], 1e-5, "down")


def test_activation_derivatives_match_autograd_in_float64():
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64).requires_grad_()
    for name, (act, act_grad) in activations.ACTIVATIONS.items():
        (autograd,) = torch.autograd.grad(act(x).sum(), x)
        smooth = ~torch.isin(x.detach(), torch.tensor([0.0, 6.0, -3.0, 3.0], dtype=torch.float64))
        assert torch.allclose(act_grad(x.detach())[smooth], autograd[smooth], atol=1e-10), name
        assert torch.allclose(act(x.detach()), ACT2FN[name](x.detach()), atol=1e-6), (
            name
        )  # the ACT2FN function


def test_unknown_activation_is_an_error_with_suggestion():
    with pytest.raises(UserError, match="did you mean 'gelu'"):
        ExpertFunction("gelo")
    with pytest.raises(UserError, match="gated"):
        ExpertFunction("swigluoai", gated=False)


def test_gpt_oss_experts_interleaved_transposed_with_biases_match_transformers():
    config = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    experts = GptOssExperts(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 2)  # large enough that both clamps are active
    experts.config._experts_implementation = "eager"
    x = torch.randn(6, H, generator=gen)
    weights, idx = torch.softmax(torch.randn(6, E, generator=gen), -1).topk(K, dim=-1)
    fn = hf.expert_weights(experts).fn
    assert (fn.activation, fn.interleaved, fn.limit) == ("swigluoai", True, config.swiglu_limit)
    grads = []
    for forward in (
        lambda: experts(x, idx, weights),
        lambda: hf.moekit_experts_forward(experts, x, idx, weights),
    ):
        experts.zero_grad()
        out = forward()
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in experts.parameters()]))
    assert_close_scaled(grads[1][0], grads[0][0], 1e-5, "out")
    for got, want in zip(grads[1][1], grads[0][1]):
        assert_close_scaled(got, want, 1e-5, "grad")


def test_nemotron_h_experts_without_gate_match_transformers():
    config = NemotronHConfig(
        hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, mlp_hidden_act="relu2"
    )
    experts = NemotronHExperts(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    experts.config._experts_implementation = "eager"
    x = torch.randn(5, H, generator=gen)
    weights, idx = torch.softmax(torch.randn(5, E, generator=gen), -1).topk(K, dim=-1)
    assert hf.expert_weights(experts).fn == ExpertFunction("relu2", gated=False)
    assert_close_scaled(hf.moekit_experts_forward(experts, x, idx, weights), experts(x, idx, weights), 1e-5)


@pytest.mark.interpreter
@pytest.mark.slow
@pytest.mark.parametrize(
    "fn,bias",
    [(fn, i % 4 in (0, 3)) for i, fn in enumerate(functions([n for n in NAMES if n in ops.ACTIVATIONS]))],
    ids=lambda v: fn_id(v) if isinstance(v, ExpertFunction) else ("bias" if v else "nobias"),
)
def test_triton_backend_matches_fp64_reference(fn, bias):
    idx, tensors = problem(fn, bias, tokens=5, seed=11)
    got, want = run("triton", fn, idx, tensors), expected(fn, idx, tensors)
    for key, value in want.items():
        assert_close_scaled(got[key], value, 1e-5, f"{fn_id(fn)} {key}")


@pytest.mark.interpreter
def test_triton_backend_bf16_with_biases():
    fn = ExpertFunction("gelu")
    idx, tensors = problem(fn, True, tokens=5, seed=12, dtype=torch.bfloat16)
    got, want = run("triton", fn, idx, tensors), expected(fn, idx, tensors)
    for key, value in want.items():
        assert_close_scaled(got[key], value, TOL[torch.bfloat16], key)


def test_triton_backend_names_what_it_cannot_run():
    with pytest.raises(UserError, match="Triton epilogues.*'mish'"):
        idx, tensors = problem(ExpertFunction("mish"), False, tokens=3, seed=0)
        run("triton", ExpertFunction("mish"), idx, tensors, grad=False)
