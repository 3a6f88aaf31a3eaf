"""The CPU torch backend's choice between native bf16/fp16 GEMMs and the fp32 upcast (moekit.runtime.cpu_dtype).

Each path is forced (MOEKIT_CPU_LOW_PRECISION) on whatever CPU runs the tests and checked, forward and backward,
against transformers' eager experts run in float32 on the same (bf16/fp16-valued) weights; tolerance:
max |Δ| <= 2e-2 × max |value| (activations and products rounded to bf16, ~4e-3 each). The choice itself is
tested with mocked capabilities and cpuinfo texts.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from moekit import moe_forward
from moekit.errors import UserError
from moekit.runtime import cpu_dtype, routing, torch_backend
from moekit.runtime.cpu_dtype import CpuCapability

TOL = 2e-2
LOW = [torch.bfloat16, torch.float16]


def assert_close_scaled(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = (got.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= TOL * scale, f"{what}: max error {err:.3g} > {TOL} * {scale:.3g}"


def make_case(tokens: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8)
    experts = MixtralExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) * 0.3)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) * 0.3)
    experts.config._experts_implementation = "eager"
    experts = experts.to(dtype)
    hidden = torch.randn(tokens, 32, generator=gen).to(dtype)
    logits = torch.randn(tokens, 8, generator=gen) * 2
    logits[:, 5] = float("-inf")  # one expert gets no tokens
    return experts, hidden, routing.SoftmaxTopKRenorm.choose(logits, 2)


def upcasts_seen(monkeypatch) -> list:
    """Records (from, to) for every weight the torch backend converts before a GEMM."""
    seen = []
    original = torch_backend.Upcaster.__call__

    def spy(self, weight):
        if weight.dtype != self.dtype:
            seen.append((weight.dtype, self.dtype))
        return original(self, weight)

    monkeypatch.setattr(torch_backend.Upcaster, "__call__", spy)
    return seen


@pytest.mark.parametrize("path", ["native", "upcast"])
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("tokens", [1, 12, 150, 700])
def test_forced_path_inference_matches_eager(monkeypatch, path, dtype, tokens):
    """Inference through every torch-backend path (decode, grouped, shared buffer, per-expert blocks)."""
    monkeypatch.setenv(cpu_dtype.ENV_VAR, path)
    assert torch_backend.compute_dtype(dtype, dtype, torch.device("cpu")) == (
        dtype if path == "native" else torch.float32
    )
    experts, hidden, r = make_case(tokens, dtype, seed=tokens)
    seen = upcasts_seen(monkeypatch)
    with torch.no_grad():
        out = moe_forward(
            hidden, r.indices, r.weights, experts.gate_up_proj, experts.down_proj, backend="torch"
        )
        expected = experts.float()(hidden.float(), r.indices, r.weights)
    assert out.dtype == dtype
    assert_close_scaled(out, expected, f"{path} {dtype} T={tokens}")
    if path == "native":
        assert not seen, seen
    elif tokens in (150, 700):  # 1 and 12 tokens (decode, grouped GEMMs) read bf16/fp16 weights as stored
        assert seen and all(to == torch.float32 for _, to in seen)


@pytest.mark.parametrize("path", ["native", "upcast"])
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_forced_path_backward_matches_eager(monkeypatch, path, dtype):
    monkeypatch.setenv(cpu_dtype.ENV_VAR, path)
    experts, hidden, r = make_case(40, dtype, seed=7)
    cotangent = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
    seen = upcasts_seen(monkeypatch)
    leaves = [
        t.detach().clone().requires_grad_()
        for t in (hidden, r.weights, experts.gate_up_proj, experts.down_proj)
    ]
    out = moe_forward(leaves[0], r.indices, *leaves[1:], backend="torch")
    (out.float() * cotangent).sum().backward()
    ref = experts.float()
    x = hidden.float().requires_grad_()
    w = r.weights.clone().requires_grad_()
    (ref(x, r.indices, w) * cotangent).sum().backward()
    assert out.dtype == dtype
    expected = [x.grad, w.grad, ref.gate_up_proj.grad, ref.down_proj.grad]
    for name, leaf, want in zip(("x", "weights", "gate_up", "down"), leaves, expected):
        assert leaf.grad.dtype == leaf.dtype, name
        assert_close_scaled(leaf.grad, want, f"{path} {dtype} d{name}")
    assert leaves[2].grad[5].abs().sum() == 0  # the idle expert
    assert (not seen) if path == "native" else bool(seen)


SAPPHIRE_RAPIDS = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
processor	: 1
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu
"""
EPYC_AVX2 = """processor	: 0
model name	: AMD EPYC
flags		: fpu sse2 avx avx2 fma
"""


def test_parse_cpuinfo():
    assert cpu_dtype.parse_cpuinfo(SAPPHIRE_RAPIDS) == (
        "Intel(R) Xeon(R) Platinum 8480+",
        {
            "fpu",
            "sse2",
            "avx2",
            "avx512f",
            "avx512bw",
            "avx512_bf16",
            "avx512_fp16",
            "amx_bf16",
            "amx_tile",
            "amx_int8",
        },
    )
    assert cpu_dtype.parse_cpuinfo(EPYC_AVX2) == ("AMD EPYC", {"fpu", "sse2", "avx", "avx2", "fma"})
    assert cpu_dtype.parse_cpuinfo("") == ("", set())


def capability(**units) -> CpuCapability:
    flags = dict(amx_bf16=False, avx512_bf16=False, amx_fp16=False, avx512_fp16=False)
    return CpuCapability(model="mock", torch_capability="AVX512", **{**flags, **units})


@pytest.mark.parametrize(
    "units,bf16,fp16",
    [
        ({}, False, False),  # AVX2 / plain AVX512: emulated bf16, upcast
        ({"avx512_bf16": True}, True, False),  # Cooper Lake, Zen 4
        ({"amx_bf16": True, "avx512_bf16": True, "avx512_fp16": True}, True, True),  # Sapphire Rapids
        ({"amx_fp16": True}, False, True),
    ],
)
def test_choice_by_mocked_capability(monkeypatch, units, bf16, fp16):
    monkeypatch.delenv(cpu_dtype.ENV_VAR, raising=False)
    cap = capability(**units)
    assert cpu_dtype.native_low_precision(torch.bfloat16, cap) is bf16
    assert cpu_dtype.native_low_precision(torch.float16, cap) is fp16
    assert cpu_dtype.native_low_precision(torch.float32, cap) is False
    monkeypatch.setattr(cpu_dtype, "cpu_capability", lambda: cap)
    cpu = torch.device("cpu")
    assert torch_backend.compute_dtype(torch.bfloat16, torch.bfloat16, cpu) == (
        torch.bfloat16 if bf16 else torch.float32
    )
    assert torch_backend.compute_dtype(torch.float16, torch.float16, cpu) == (
        torch.float16 if fp16 else torch.float32
    )
    assert torch_backend.compute_dtype(torch.float32, torch.bfloat16, cpu) == torch.float32


def test_capability_from_cpuinfo_and_torch_probes(monkeypatch, tmp_path):
    """Flags come from /proc/cpuinfo or from torch's probes, whichever says yes."""
    fake = tmp_path / "cpuinfo"
    fake.write_text(SAPPHIRE_RAPIDS)
    real_path = cpu_dtype.Path
    monkeypatch.setattr(
        cpu_dtype, "Path", lambda p: real_path(fake) if p == "/proc/cpuinfo" else real_path(p)
    )
    cpu_dtype.cpu_capability.cache_clear()
    try:
        cap = cpu_dtype.cpu_capability()
        assert cap.model == "Intel(R) Xeon(R) Platinum 8480+"
        assert (cap.amx_bf16, cap.avx512_bf16, cap.avx512_fp16) == (True, True, True)
        assert "amx_bf16" in cap.summary()
        fake.write_text(EPYC_AVX2)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
        cpu_dtype.cpu_capability.cache_clear()
        cap = cpu_dtype.cpu_capability()
        assert (cap.amx_bf16, cap.avx512_bf16, cap.amx_fp16, cap.avx512_fp16) == (False, True, False, False)
    finally:
        cpu_dtype.cpu_capability.cache_clear()


def test_this_cpu_picks_by_its_flags(monkeypatch):
    """Unforced, the path follows this machine's own flags (read here independently of moekit)."""
    monkeypatch.delenv(cpu_dtype.ENV_VAR, raising=False)
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        pytest.fail("these tests expect a Linux /proc/cpuinfo")
    has_bf16 = bool(flags & {"amx_bf16", "avx512_bf16"}) or torch.cpu._is_avx512_bf16_supported()
    want = torch.bfloat16 if has_bf16 else torch.float32
    assert torch_backend.compute_dtype(torch.bfloat16, torch.bfloat16, torch.device("cpu")) == want


def test_bad_override_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(cpu_dtype.ENV_VAR, "fast")
    with pytest.raises(
        UserError, match="MOEKIT_CPU_LOW_PRECISION='fast': expected one of auto, native, upcast"
    ):
        cpu_dtype.native_low_precision(torch.bfloat16)
