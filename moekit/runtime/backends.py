"""Which code runs the experts: the backend table and the automatic choice by device.

Every backend has the same contract: fn(hidden [T, H], top_k_index [T, k], top_k_weights [T, k],
gate_up_proj [E, 2I, H], down_proj [E, H, I]) -> [T, H] in hidden's dtype, SwiGLU experts, differentiable,
and assignments whose id lies outside [0, E) contribute nothing. Optional dependencies (triton, megablocks)
are imported only when their backend is chosen, so `import moekit.runtime` stays light.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import cache

import torch

from moekit.errors import UserError, did_you_mean
from moekit.runtime.torch_backend import torch_experts

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def triton_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj) -> torch.Tensor:
    """The Triton kernels of `moekit.kernels` (GPU, or the CPU interpreter under TRITON_INTERPRET=1)."""
    from moekit.kernels import triton_moe_experts

    # The kernels take one dtype for activations and weights; the output keeps the caller's dtype.
    out = triton_moe_experts(
        hidden.to(gate_up_proj.dtype), top_k_index, top_k_weights, gate_up_proj, down_proj
    )
    return out.to(hidden.dtype)


def megablocks_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj) -> torch.Tensor:
    """MegaBlocks' dropless grouped GEMM (`grouped_gemm.ops.gmm`, differentiable) on expert-sorted rows."""
    from megablocks import grouped_gemm_util

    num_experts, top_k = gate_up_proj.shape[0], top_k_index.shape[-1]
    flat = top_k_index.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    order = torch.argsort(torch.where(valid, flat, num_experts), stable=True)[: int(valid.sum())]
    batch_sizes = torch.bincount(flat[order], minlength=num_experts).cpu()  # gmm wants int64 sizes on the CPU
    tokens = order // top_k
    preact = grouped_gemm_util.ops.gmm(hidden[tokens], gate_up_proj, batch_sizes, trans_b=True)
    gate, up = preact.chunk(2, dim=-1)
    rows_out = grouped_gemm_util.ops.gmm(
        torch.nn.functional.silu(gate) * up, down_proj, batch_sizes, trans_b=True
    )
    rows_out = rows_out.float() * top_k_weights.reshape(-1)[order, None].float()
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device).index_add(0, tokens, rows_out)
    return out.to(hidden.dtype)


BACKENDS: dict[str, ExpertsFn] = {
    "torch": torch_experts,
    "triton": triton_experts,
    "megablocks": megablocks_experts,
}


@cache
def megablocks_usable() -> bool:
    """MegaBlocks needs CUDA and its compiled extension; on a CPU machine it cannot even be imported."""
    if not torch.cuda.is_available() or importlib.util.find_spec("megablocks") is None:
        return False
    try:
        from megablocks import grouped_gemm_util
    except Exception:  # its CUDA extension failed to load: treat as absent
        return False
    return grouped_gemm_util.grouped_gemm_is_available()


@cache
def triton_usable() -> bool:
    """Triton kernels run on CUDA devices (the interpreter path is opt-in by naming the backend)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return False
    from moekit.kernels import triton_available

    return triton_available()


def choose_backend(name: str, device: torch.device) -> str:
    """Resolve `name` ("auto" or a key of BACKENDS) for tensors on `device`.

    auto: `triton` on CUDA when the kernels are usable, else `megablocks` when it imports, else `torch`.
    """
    if name == "auto":
        if device.type == "cuda" and triton_usable():
            return "triton"
        if device.type == "cuda" and megablocks_usable():
            return "megablocks"
        return "torch"
    if name not in BACKENDS:
        raise UserError(
            f"unknown experts backend {name!r}{did_you_mean(name, BACKENDS)}; "
            f"choose auto or one of {', '.join(BACKENDS)}"
        )
    return name
