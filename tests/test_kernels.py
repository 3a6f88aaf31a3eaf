"""The Triton MoE kernels against their torch twins and against a dumb per-token loop.

Runs on the CPU under TRITON_INTERPRET=1 (set by conftest.py when no CUDA device is present), so shapes
are tiny. Tolerances, elementwise: |got - want| <= tol * (|want| + max|want|), with tol = 1e-5 for fp32
inputs and 2e-2 for fp16/bf16 inputs (their hidden activations are stored in that dtype, ~4e-3 each).
The last test compiles the kernels for an H100 (sm_90) without a GPU and checks the generated code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import moekit.kernels
import pytest
import torch
import torch.nn.functional as F
from moekit.kernels import ops
from moekit.kernels import reference as ref

from moekit.errors import UserError

pytestmark = pytest.mark.interpreter

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
# Small tiles: I=24 and H=40 then span partial column blocks and several reduction steps.
SMALL = ops.TileConfig(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1)
# conftest.py sets TRITON_INTERPRET=1 when there is no GPU; on a GPU the same tests run there.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    bound = tol * (want.abs() + want.abs().max())
    err = (got - want).abs()
    assert bool((err <= bound).all()), (
        f"max error {err.max():.3g}, allowed {bound.min():.3g}..{bound.max():.3g}"
    )


def routing(gen: torch.Generator, tokens: int, top_k: int, used_experts: int) -> torch.Tensor:
    """Distinct experts per token, all below `used_experts`, so higher experts get no tokens."""
    return torch.stack([torch.randperm(used_experts, generator=gen)[:top_k] for _ in range(tokens)])


def make_inputs(seed: int, tokens: int, size: int, inter: int, experts: int, top_k: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    idx = routing(gen, tokens, top_k, experts - 1)  # the last expert receives no tokens
    weights = torch.rand(tokens, top_k, generator=gen) + 0.1
    hidden = torch.randn(tokens, size, generator=gen)
    gate_up = torch.randn(experts, 2 * inter, size, generator=gen) / size**0.5
    down = torch.randn(experts, size, inter, generator=gen) / inter**0.5
    return [t.to(DEVICE) for t in (idx, weights, hidden.to(dtype), gate_up.to(dtype), down.to(dtype))]


def dumb_moe(hidden, idx, weights, gate_up, down):
    """One token and one chosen expert at a time, straight from the definition."""
    inter = down.shape[2]
    rows = []
    for t in range(hidden.shape[0]):
        acc = torch.zeros(hidden.shape[1], dtype=hidden.dtype)
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            gate_up_t = gate_up[e] @ hidden[t]
            acc = acc + weights[t, j] * (down[e] @ (F.silu(gate_up_t[:inter]) * gate_up_t[inter:]))
        rows.append(acc)
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------


def test_triton_available_here():
    assert moekit.kernels.triton_available()


def test_without_triton_import_works_and_call_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail as if not installed
    assert not moekit.kernels.triton_available()
    with pytest.raises(UserError, match="triton is not usable"):
        moekit.kernels.triton_moe_experts(*[torch.zeros(1, 1)] * 5)


def test_bad_shapes_and_dtypes_are_user_errors():
    idx, weights, hidden, gate_up, down = make_inputs(0, 3, 16, 8, 3, 1, torch.float32)
    with pytest.raises(UserError, match="shapes"):
        moekit.kernels.triton_moe_experts(hidden, idx, weights, gate_up, down.transpose(1, 2))
    with pytest.raises(UserError, match="dtype"):
        moekit.kernels.triton_moe_experts(hidden, idx, weights, gate_up.half(), down)


# ---------------------------------------------------------------------------------------------------------
# Each kernel against its torch twin
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", [1, 5])
def test_histogram_offsets_and_sort(num_experts):
    gen = torch.Generator().manual_seed(num_experts)
    ids = torch.randint(-1, num_experts + 1, (1500,), generator=gen)  # -1 and E are dropped; > one BLOCK
    ids[ids == num_experts - 1] = 0  # leave one expert without rows (when E > 1)
    counts, offsets = ops.expert_offsets(ids.int().to(DEVICE), num_experts)
    want_counts, want_offsets = ref.expert_offsets_reference(ids, num_experts)
    assert torch.equal(counts.cpu(), want_counts) and torch.equal(offsets.cpu(), want_offsets)
    order = ops.sort_by_expert(ids.int().to(DEVICE), offsets)
    valid = int(want_offsets[-1])
    assert torch.equal(order[:valid].cpu(), ref.sort_by_expert_reference(ids, num_experts)[:valid])


def _sorted_problem(seed: int, top_k: int):
    idx, weights, hidden, gate_up, down = make_inputs(seed, 11, 40, 24, 4, top_k, torch.float32)
    idx[0, 0] = -1  # a dropped assignment
    _, offsets = ops.expert_offsets(idx.int(), 4)
    order = ops.sort_by_expert(idx.int(), offsets)
    return idx, weights, hidden, gate_up, down, order, offsets, int(offsets[-1])


@pytest.mark.parametrize("top_k", [1, 2])
def test_forward_kernels_match_reference(top_k):
    idx, weights, hidden, gate_up, down, order, offsets, valid = _sorted_problem(10 + top_k, top_k)

    h, preact = ops.gate_up_swiglu(hidden, gate_up, order, offsets, top_k, store_preact=True, tiles=SMALL)
    want_h, want_preact = ref.gate_up_swiglu_reference(
        hidden, gate_up, order, offsets, top_k, store_preact=True
    )
    assert_close(h[:valid], want_h[:valid], 1e-5)
    assert_close(preact[:valid], want_preact[:valid], 1e-5)
    out = ops.down_combine(h, down, order, offsets, weights, 11, top_k, tiles=SMALL)
    assert_close(out, ref.down_combine_reference(h, down, order, offsets, weights, 11, top_k), 1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_backward_kernels_match_reference(top_k):
    idx, weights, hidden, gate_up, down, order, offsets, valid = _sorted_problem(20 + top_k, top_k)
    grad_out = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(30 + top_k)).to(DEVICE)
    _, preact = ref.gate_up_swiglu_reference(hidden, gate_up, order, offsets, top_k, store_preact=True)
    h = F.silu(preact[:, :24]) * preact[:, 24:]

    d_preact, grad_w = ops.down_backward(grad_out, down, preact, order, offsets, weights, top_k, tiles=SMALL)
    want_d_preact, want_grad_w = ref.down_backward_reference(
        grad_out, down, preact, order, offsets, weights, top_k
    )
    assert_close(d_preact[:valid], want_d_preact[:valid], 1e-5)
    assert_close(grad_w, want_grad_w, 1e-5)
    assert grad_w[0] == 0  # the dropped assignment

    for a, b, gather_a, gather_b, scale, shape in [
        (grad_out, h, True, False, weights, down.shape),  # d down_proj
        (d_preact, hidden, False, True, None, gate_up.shape),  # d gate_up_proj
    ]:
        got = ops.grouped_weight_grad(
            a, b, order, offsets, top_k, gather_a=gather_a, gather_b=gather_b,
            out=torch.full(shape, float("nan"), device=DEVICE), scale=scale, tiles=SMALL,
        )  # fmt: skip
        want = ref.grouped_weight_grad_reference(
            a,
            b,
            order,
            offsets,
            top_k,
            gather_a=gather_a,
            gather_b=gather_b,
            out=torch.empty(shape, device=DEVICE),
            scale=scale,
        )
        assert_close(got, want, 1e-5)
        assert torch.equal(got[3], torch.zeros_like(got[3]))  # expert without rows

    slots = ops.grouped_gemm(
        d_preact, gate_up, order, offsets, top_k, gather_a=False, out=torch.zeros(11 * top_k, 40, device=DEVICE),
        transpose_weight=True, tiles=SMALL,
    )  # fmt: skip
    want = ref.grouped_gemm_reference(
        d_preact,
        gate_up,
        order,
        offsets,
        top_k,
        gather_a=False,
        out=torch.zeros(11 * top_k, 40, device=DEVICE),
        transpose_weight=True,
    )
    assert_close(slots, want, 1e-5)


# ---------------------------------------------------------------------------------------------------------
# The autograd entry point against the dumb loop (float64 autograd)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, top_k, experts, tokens",
    [
        (torch.float32, 1, 4, 9),
        (torch.float32, 2, 4, 24),
        (torch.float32, 4, 6, 7),
        (torch.bfloat16, 2, 4, 24),
        (torch.float16, 2, 4, 13),
    ],
)
def test_triton_moe_experts_forward_backward(dtype, top_k, experts, tokens):
    idx, weights, hidden, gate_up, down = make_inputs(40 + top_k, tokens, 32, 32, experts, top_k, dtype)
    grad_out = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    tol = TOL[dtype]

    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weights, gate_up, down)]
    out = moekit.kernels.triton_moe_experts(leaves[0], idx, leaves[1], leaves[2], leaves[3])
    assert out.dtype == dtype and out.shape == hidden.shape
    out.float().backward(grad_out)

    refs = [t.detach().double().cpu().requires_grad_() for t in (hidden, weights, gate_up, down)]
    want = dumb_moe(refs[0], idx.cpu(), refs[1], refs[2], refs[3])
    want.backward(grad_out.double().cpu())

    assert_close(out, want, tol)
    for name, got, want_leaf in zip(["hidden", "top_k_weights", "gate_up_proj", "down_proj"], leaves, refs):
        assert got.grad.dtype == got.dtype, name
        assert_close(got.grad, want_leaf.grad, tol)
    assert not leaves[2].grad[-1].any() and not leaves[3].grad[-1].any()  # the expert with no tokens


def test_inference_matches_keeps_nothing_and_tiles_do_not_change_results(monkeypatch):
    idx, weights, hidden, gate_up, down = make_inputs(5, 17, 40, 24, 4, 2, torch.float32)
    gate_up.requires_grad_()  # parameters require grad in inference too; no_grad must still keep nothing
    kept = []
    gate_up_swiglu = ops.gate_up_swiglu

    def recording(*args, **kwargs):
        kept.append(kwargs["store_preact"])
        return gate_up_swiglu(*args, **kwargs)

    monkeypatch.setattr(ops, "gate_up_swiglu", recording)
    with torch.no_grad():
        default = moekit.kernels.triton_moe_experts(hidden, idx, weights, gate_up, down)
        small = moekit.kernels.triton_moe_experts(hidden, idx, weights, gate_up, down, tiles=SMALL)
    want = dumb_moe(
        *[
            t.detach().double().cpu() if t.is_floating_point() else t.cpu()
            for t in (hidden, idx, weights, gate_up, down)
        ]
    )
    assert_close(default, want, 1e-5)
    assert_close(small, want, 1e-5)
    assert kept == [False, False]


# ---------------------------------------------------------------------------------------------------------
# GPU code generation, checked without a GPU
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kernels_compile_for_h100_with_wgmma_and_pipelined_loads():
    # The interpreter accepts code the GPU compiler may reject; compile for sm_90 in a process without
    # TRITON_INTERPRET (kernels are defined per mode at import) and check what tl.dot and the loads became.
    script = (
        "import json; from dataclasses import asdict; from moekit.kernels.aot_check import check;"
        "print(json.dumps([asdict(r) for r in check(90, 'bf16')]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reports = {r["name"]: r for r in json.loads(done.stdout.strip().splitlines()[-1])}
    routing_and_combine = ("expert_offsets", "sort_by_expert", "combine_slots")
    gemms = [name for name in reports if name not in routing_and_combine]
    assert len(gemms) == 6 and set(routing_and_combine) <= set(reports)
    for name in gemms:
        assert reports[name]["wgmma"] and reports[name]["cp_async"], reports[name]
        assert reports[name]["shared_bytes"] <= 227 * 1024, reports[name]
    # the fused SwiGLU kernel multi-buffers A and both weight tiles: >= 2 stages x (16 + 2 x 16) KiB
    assert reports["gate_up_swiglu"]["shared_bytes"] >= 2 * 48 * 1024
