"""Whether the CPU multiplies bf16/fp16 natively or the torch backend should upcast them to fp32.

On a CPU with bf16 units (AMX-BF16 tiles or AVX512-BF16 dot products, e.g. Sapphire Rapids, Zen 4) oneDNN runs
bf16 GEMMs faster than fp32 ones and transformers' own bf16 experts beat an fp32 upcast 2-3x (measured on an
AMX Xeon). On a CPU without them (AVX2 hosts such as the 2-core EPYC this project is measured on) a bf16 GEMM
is emulated and runs 5-10x slower than fp32, so there the weights are upcast.

Detection is by capability probes only, no micro-benchmark (a timing taken on a busy shared machine would pick by
noise, and it would cost every first call): torch's own cpuinfo-based probes (`torch.cpu._is_amx_tile_supported`,
`_is_avx512_bf16_supported`, `_is_amx_fp16_supported`), or-ed with the flags of /proc/cpuinfo (`amx_bf16`,
`avx512_bf16`, `amx_fp16`, `avx512_fp16`) where the kernel exposes it, since torch has no avx512-fp16 probe.
The result is cached per process. `MOEKIT_CPU_LOW_PRECISION=native|upcast` forces a path (`auto`, the default,
decides by capability).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.errors import UserError

ENV_VAR = "MOEKIT_CPU_LOW_PRECISION"
_CHOICES = ("auto", "native", "upcast")


@dataclass(frozen=True)
class CpuCapability:
    """What this CPU offers for low-precision GEMMs."""

    model: str
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): the widest vector ISA ATen dispatches to
    amx_bf16: bool
    avx512_bf16: bool
    amx_fp16: bool
    avx512_fp16: bool

    def native(self, dtype: torch.dtype) -> bool:
        """Whether `dtype` GEMMs run on bf16/fp16 units rather than being emulated."""
        if dtype == torch.bfloat16:
            return self.amx_bf16 or self.avx512_bf16
        if dtype == torch.float16:
            return self.amx_fp16 or self.avx512_fp16
        return False

    def summary(self) -> str:
        flags = [
            name for name in ("amx_bf16", "avx512_bf16", "amx_fp16", "avx512_fp16") if getattr(self, name)
        ]
        return (
            f"{self.model} (torch ISA {self.torch_capability}; bf16/fp16 units: {', '.join(flags) or 'none'})"
        )


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in a /proc/cpuinfo text."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / arm64
            flags = set(value.split())
    return model, flags


def _probe(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


@functools.cache
def cpu_capability() -> CpuCapability:
    """This process's CPU, probed once."""
    cpuinfo = Path("/proc/cpuinfo")
    model, flags = parse_cpuinfo(cpuinfo.read_text()) if cpuinfo.exists() else ("", set())
    return CpuCapability(
        model=model or platform.processor() or platform.machine(),
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        amx_bf16=("amx_bf16" in flags) or _probe("_is_amx_tile_supported"),
        avx512_bf16=("avx512_bf16" in flags) or _probe("_is_avx512_bf16_supported"),
        amx_fp16=("amx_fp16" in flags) or _probe("_is_amx_fp16_supported"),
        avx512_fp16="avx512_fp16" in flags,
    )


def native_low_precision(dtype: torch.dtype, capability: CpuCapability | None = None) -> bool:
    """Whether the CPU torch backend should multiply `dtype` (bf16/fp16) natively instead of upcasting to fp32."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise UserError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {', '.join(_CHOICES)}")
    if choice != "auto":
        return choice == "native" and dtype in (torch.bfloat16, torch.float16)
    return (capability or cpu_capability()).native(dtype)
