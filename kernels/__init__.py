"""Triton kernels for Mixture-of-Experts layers (shipped as `moekit.kernels`; design in kernels/README.md).

`import moekit.kernels` needs neither triton nor a GPU: the kernels live in submodules that are imported on
first use, because `triton.jit` decides when a kernel is defined whether it runs on the GPU or on the CPU
interpreter (TRITON_INTERPRET=1), so the environment must be settled before that.

- `triton_moe_experts(...)`: the differentiable SwiGLU experts (see `moekit.kernels.experts`).
- `triton_available()`: whether that can run here.
- `moekit.kernels.ops`: the individual kernels; `moekit.kernels.reference`: their plain-torch twins.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["triton_available", "triton_moe_experts"]


def triton_available() -> bool:
    """True when triton imports and kernels can run: on a CUDA device, or on the CPU with TRITON_INTERPRET=1."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:  # a broken install counts as missing
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_moe_experts(
    hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, **options
) -> torch.Tensor:
    """The experts' output [T, H]; see `moekit.kernels.experts.triton_moe_experts` for the contract."""
    if not triton_available():
        from moekit.errors import UserError

        raise UserError(
            "moekit.kernels: triton is not usable here (needs `pip install triton` and a CUDA GPU, "
            "or TRITON_INTERPRET=1 for the CPU interpreter); use the torch backend instead"
        )
    from moekit.kernels.experts import triton_moe_experts as _triton_moe_experts

    return _triton_moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, **options)
