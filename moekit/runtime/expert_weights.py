"""The weights of a bank of experts, as every backend receives them."""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekit.runtime.activations import SWIGLU, ExpertFunction


class ExpertWeights(NamedTuple):
    """gate_up_proj [E, P, H] (P = 2I gated, gate then up rows or interleaved; P = I without a gate) and
    down_proj [E, H, I], as transformers stores them untransposed; a transposed layout is passed as a
    `.transpose(1, 2)` view. Biases, when present, are [E, P] and [E, H] and added before the activation and
    before the routing weight."""

    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    fn: ExpertFunction = SWIGLU

    @property
    def is_plain_swiglu(self) -> bool:
        """SiLU-gated, concatenated halves, no biases: what every backend runs."""
        return self.fn.is_default and self.gate_up_bias is None and self.down_bias is None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The differentiable weights that are present."""
        return tuple(t for t in self[:4] if t is not None)
