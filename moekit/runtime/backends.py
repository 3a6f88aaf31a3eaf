"""Which code runs the experts: the backend table and the automatic choice by device and expert function.

Every backend is a module-like object with the same two functions:
- `forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k], weights: ExpertWeights, keep: bool)
  -> (out [T, H] in hidden's dtype, saved)`; `saved` (with `keep`) is what `backward` needs;
- `backward(grad_out, saved, top_k_weights, weights, needs) -> [d hidden, d top_k_weights, d gate_up_proj,
  d down_proj, d gate_up_bias, d down_bias]` (None where `needs` says no);
and `unsupported(weights) -> str | None`, why it cannot run those weights. A backend whose forward is
differentiable by itself (megablocks) has `backward=None`. Assignments whose id lies outside
[0, E) contribute nothing. Optional dependencies (triton, megablocks) are imported only when their backend is
chosen, so `import moekit.runtime` stays light.
"""

from __future__ import annotations

import importlib.util
import types
from functools import cache

import torch

from moekit.errors import UserError, did_you_mean
from moekit.runtime import torch_backend
from moekit.runtime.expert_weights import ExpertWeights
from moekit.runtime.sorting import sort_by_expert


def _torch_unsupported(weights: ExpertWeights) -> str | None:
    return None


def _triton_forward(hidden, top_k_index, top_k_weights, weights: ExpertWeights, keep: bool):
    from moekit.kernels.experts import triton_forward

    # The kernels take one dtype for activations and weights; the output keeps the caller's dtype.
    out, saved = triton_forward(
        hidden.to(weights.gate_up_proj.dtype), top_k_index, top_k_weights, weights, keep
    )
    return out.to(hidden.dtype), None if saved is None else saved._replace(hidden_dtype=hidden.dtype)


def _triton_backward(grad_out, saved, top_k_weights, weights: ExpertWeights, needs):
    from moekit.kernels.experts import triton_backward

    grads = triton_backward(grad_out, saved, top_k_weights, weights, needs)
    if grads[0] is not None:
        grads[0] = grads[0].to(saved.hidden_dtype)
    return grads


def _triton_unsupported(weights: ExpertWeights) -> str | None:
    from moekit.kernels.experts import unsupported

    return unsupported(weights)


def _megablocks_forward(hidden, top_k_index, top_k_weights, weights: ExpertWeights, keep: bool):
    """MegaBlocks' dropless grouped GEMM on expert-sorted rows; `gmm` is differentiable itself, so this backend
    has no `backward` and autograd runs through it (`keep` is unused)."""
    from megablocks import grouped_gemm_util

    rows = sort_by_expert(top_k_index, weights.gate_up_proj.shape[0])
    order = rows.order[: rows.num_kept]
    batch_sizes = rows.counts.cpu()  # gmm wants int64 sizes on the CPU
    tokens = rows.tokens[: rows.num_kept]
    preact = grouped_gemm_util.ops.gmm(hidden[tokens], weights.gate_up_proj, batch_sizes, trans_b=True)
    gate, up = preact.chunk(2, dim=-1)
    rows_out = grouped_gemm_util.ops.gmm(
        torch.nn.functional.silu(gate) * up, weights.down_proj, batch_sizes, trans_b=True
    )
    rows_out = rows_out.float() * top_k_weights.reshape(-1)[order, None].float()
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device).index_add(0, tokens, rows_out)
    return out.to(hidden.dtype), None


def _megablocks_unsupported(weights: ExpertWeights) -> str | None:
    if not weights.is_plain_swiglu:
        return "megablocks runs SiLU-gated experts without biases only"
    return None


BACKENDS = {
    "torch": types.SimpleNamespace(
        forward=torch_backend.forward, backward=torch_backend.backward, unsupported=_torch_unsupported
    ),
    "triton": types.SimpleNamespace(
        forward=_triton_forward, backward=_triton_backward, unsupported=_triton_unsupported
    ),
    "megablocks": types.SimpleNamespace(
        forward=_megablocks_forward, backward=None, unsupported=_megablocks_unsupported
    ),
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


def choose_backend(name: str, device: torch.device, weights: ExpertWeights | None = None) -> str:
    """Resolve `name` ("auto" or a key of BACKENDS) for tensors on `device` and these expert weights.

    auto: `triton` on CUDA when the kernels are usable and run these weights, else `megablocks` likewise,
    else `torch` (which runs every expert function). A named backend that cannot run them is an error.
    """
    if name == "auto":
        if (
            device.type == "cuda"
            and triton_usable()
            and (weights is None or not _triton_unsupported(weights))
        ):
            return "triton"
        if device.type == "cuda" and megablocks_usable():
            if weights is None or not _megablocks_unsupported(weights):
                return "megablocks"
        return "torch"
    if name not in BACKENDS:
        raise UserError(
            f"unknown experts backend {name!r}{did_you_mean(name, BACKENDS)}; "
            f"choose auto or one of {', '.join(BACKENDS)}"
        )
    reason = None if weights is None else BACKENDS[name].unsupported(weights)
    if reason:
        raise UserError(f"experts backend {name!r} cannot run these experts: {reason}; use backend='torch'")
    return name
