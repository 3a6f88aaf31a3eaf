"""moe_forward with backend="triton" against the torch backend, on tiny shapes: on CUDA tensors where a GPU is
present, else on the CPU interpreter (TRITON_INTERPRET=1 from conftest). The torch backend's reference always
runs on CPU copies. fp32: max |Δ| <= 1e-5 × max |value|; bf16: 2e-2 (the kernels round their intermediate
activations to bf16, the torch backend keeps fp32)."""

import os

import pytest
import torch

from moekit import moe_forward
from moekit.runtime import routing

pytestmark = pytest.mark.interpreter


def triton_device(cuda_available: bool, interpret: str | None) -> str:
    """Where the Triton backend's inputs must live: compiled kernels need CUDA tensors, and CPU tensors are
    only valid under the interpreter."""
    if interpret == "1":
        return "cpu"
    if cuda_available:
        return "cuda"
    raise RuntimeError("no CUDA device and TRITON_INTERPRET is not 1: the triton backend cannot run here")


DEVICE = triton_device(torch.cuda.is_available(), os.environ.get("TRITON_INTERPRET"))


def test_placement_follows_the_machine():
    assert triton_device(cuda_available=True, interpret=None) == "cuda"
    assert triton_device(cuda_available=True, interpret="0") == "cuda"
    assert triton_device(cuda_available=False, interpret="1") == "cpu"
    assert triton_device(cuda_available=True, interpret="1") == "cpu"  # interpreter forced on a GPU machine
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_device(cuda_available=False, interpret=None)
    # this session: conftest sets the interpreter exactly when there is no GPU
    assert DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")


def assert_close_scaled(got, expected, tol, what=""):
    err = (got.float().cpu() - expected.float().cpu()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


def make_inputs(dtype, tokens=7, hidden=16, inter=8, num_experts=4, k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    logits = torch.randn(tokens, num_experts, generator=gen)
    logits[:, num_experts - 1] = float("-inf")  # the last expert gets no tokens
    r = routing.SoftmaxTopKRenorm.choose(logits, k)
    gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.3).to(dtype)
    down = (torch.randn(num_experts, hidden, inter, generator=gen) * 0.3).to(dtype)
    return x, r, gate_up, down


def on(device, x, r, gate_up, down):
    return (
        x.to(device),
        routing.Routing(r.weights.to(device), r.indices.to(device)),
        gate_up.to(device),
        down.to(device),
    )


def forward_backward(backend, x, r, gate_up, down):
    leaves = [t.clone().requires_grad_() for t in (x, r.weights, gate_up, down)]
    out = moe_forward(leaves[0], r.indices, leaves[1], leaves[2], leaves[3], backend=backend)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.device)
    (out.float() * cotangent).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_triton_backend_matches_torch_backend(dtype, tol):
    inputs = make_inputs(dtype)
    expected = forward_backward("torch", *inputs)
    got = forward_backward("triton", *on(DEVICE, *inputs))
    for name, g, e in zip(("out", "x", "weights", "gate_up", "down"), got, expected):
        assert g.dtype == e.dtype, name
        assert g.device.type == DEVICE, name
        assert_close_scaled(g, e, tol, name)
    assert got[3][-1].abs().sum() == 0  # the idle expert's gradient


def test_triton_backend_skips_dropped_assignments():
    x, r, gate_up, down = make_inputs(torch.float32, tokens=9, seed=3)
    dropped = routing.drop_over_capacity(r, 4, capacity_factor=0.5)
    assert (dropped.indices == 4).any()
    expected = moe_forward(x, dropped.indices, dropped.weights, gate_up, down, backend="torch")
    x, dropped, gate_up, down = on(DEVICE, x, dropped, gate_up, down)
    got = moe_forward(x, dropped.indices, dropped.weights, gate_up, down, backend="triton")
    assert_close_scaled(got, expected, 1e-5)
