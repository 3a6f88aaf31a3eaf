"""What an expert computes between its two projections: the activation, gated or not, and its derivative.

An `ExpertFunction` names it with plain values (a string and a few scalars), so it can cross a
`torch.library` op boundary and pick a Triton epilogue. With a gate, the pre-activation holds the gate and up
halves (concatenated: gate rows then up rows, as Mixtral and Qwen store them; interleaved: gate0, up0, gate1,
up1 ..., as gpt-oss stores them) and the expert computes act(gate) * up; without one it computes act(preact).

Derivatives are written out rather than taken by autograd, because the backward of the experts op runs
inside an opaque op where autograd does not reach. The tests check each against fp64 autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moekit.errors import UserError, did_you_mean

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_CUBIC = 0.044715
_QUICK_GELU = 1.702


def _silu_grad(x):
    sig = torch.sigmoid(x)
    return sig * (1 + x * (1 - sig))


def _gelu_grad(x):
    return 0.5 * (1 + torch.erf(x * math.sqrt(0.5))) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _gelu_tanh_grad(x):
    t = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_CUBIC * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_CUBIC * x * x)


def _quick_gelu(x):
    return x * torch.sigmoid(_QUICK_GELU * x)


def _quick_gelu_grad(x):
    sig = torch.sigmoid(_QUICK_GELU * x)
    return sig + _QUICK_GELU * x * sig * (1 - sig)


def _gelu_10(x):
    return torch.clamp(F.gelu(x), -10, 10)


def _gelu_10_grad(x):
    y = F.gelu(x)
    return _gelu_grad(x) * ((y >= -10) & (y <= 10))


def _mish_grad(x):
    t = torch.tanh(F.softplus(x))
    return t + x * (1 - t * t) * torch.sigmoid(x)


def _hardswish_grad(x):
    return torch.where(x < -3, 0.0, torch.where(x > 3, 1.0, (2 * x + 3) / 6)).to(x.dtype)


def _sigmoid_grad(x):
    sig = torch.sigmoid(x)
    return sig * (1 - sig)


def _tanh_grad(x):
    t = torch.tanh(x)
    return 1 - t * t


# name -> (act, act'); elementwise, no parameters. The names are transformers' ACT2FN keys.
ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "silu": (F.silu, _silu_grad),
    "gelu": (F.gelu, _gelu_grad),
    "gelu_pytorch_tanh": (lambda x: F.gelu(x, approximate="tanh"), _gelu_tanh_grad),
    "quick_gelu": (_quick_gelu, _quick_gelu_grad),
    "gelu_10": (_gelu_10, _gelu_10_grad),
    "relu": (F.relu, lambda x: (x > 0).to(x.dtype)),
    "relu2": (lambda x: F.relu(x).square(), lambda x: 2 * F.relu(x)),
    "relu6": (F.relu6, lambda x: ((x > 0) & (x < 6)).to(x.dtype)),
    "leaky_relu": (F.leaky_relu, lambda x: torch.where(x > 0, 1.0, 0.01).to(x.dtype)),
    "mish": (F.mish, _mish_grad),
    "hardswish": (F.hardswish, _hardswish_grad),
    "sigmoid": (torch.sigmoid, _sigmoid_grad),
    "tanh": (torch.tanh, _tanh_grad),
    "linear": (lambda x: x, torch.ones_like),
}
# gpt-oss's clamped GLU: gate clamped above at `limit`, up to [-limit, limit]; (up + 1) · gate · σ(α · gate).
SWIGLU_OAI = "swigluoai"
# ACT2FN keys that compute the same function as a key above.
ALIASES = {
    "swish": "silu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_pytorch_tanh",
    "gelu_fast": "gelu_pytorch_tanh",
    "gelu_python_tanh": "gelu_pytorch_tanh",
    "gelu_accurate": "gelu_pytorch_tanh",
}


@dataclass(frozen=True)
class ExpertFunction:
    """act(gate) * up (gated) or act(preact), with the activation named by an ACT2FN key or "swigluoai"."""

    activation: str = "silu"
    gated: bool = True
    interleaved: bool = False  # gate/up rows alternate (gpt-oss) instead of gate rows then up rows
    alpha: float = 1.702  # swigluoai only
    limit: float = 7.0  # swigluoai only

    def __post_init__(self):
        name = ALIASES.get(self.activation, self.activation)
        object.__setattr__(self, "activation", name)
        known = [*ACTIVATIONS, SWIGLU_OAI, *ALIASES]
        if name not in ACTIVATIONS and name != SWIGLU_OAI:
            raise UserError(
                f"experts activation {self.activation!r} is not supported{did_you_mean(self.activation, known)}; "
                f"moekit runs {', '.join(sorted(known))}"
            )
        if name == SWIGLU_OAI and not self.gated:
            raise UserError("experts activation 'swigluoai' is a gated function: it needs gate and up rows")
        if self.interleaved and not self.gated:
            raise UserError("experts: an interleaved gate/up layout needs a gated expert function")

    @property
    def is_default(self) -> bool:
        """SiLU-gated with concatenated halves: the function Mixtral, Qwen and DeepSeek experts compute."""
        return self == ExpertFunction()


SWIGLU = ExpertFunction()


def split_gate_up(preact: torch.Tensor, fn: ExpertFunction, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up halves of a gated pre-activation along `dim`."""
    if fn.interleaved:
        return preact.unfold(dim, 2, 2).unbind(-1)
    return preact.chunk(2, dim=dim)


def join_gate_up(gate: torch.Tensor, up: torch.Tensor, fn: ExpertFunction, dim: int) -> torch.Tensor:
    """Inverse of `split_gate_up`."""
    if fn.interleaved:
        return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)
    return torch.cat([gate, up], dim=dim)


def apply(preact: torch.Tensor, fn: ExpertFunction, *, in_place: bool = False, dim: int = 0) -> torch.Tensor:
    """The expert's hidden activation from its pre-activation ([P, n] with dim 0, or [n, P] with dim 1).

    `in_place` may overwrite `preact` (saves temporaries when it is not kept for the backward pass)."""
    if not fn.gated:
        act = ACTIVATIONS[fn.activation][0]
        if in_place and fn.activation == "silu":
            return F.silu(preact, inplace=True)
        return act(preact)
    gate, up = split_gate_up(preact, fn, dim)
    if fn.activation == SWIGLU_OAI:
        gate = gate.clamp(max=fn.limit)
        up = up.clamp(-fn.limit, fn.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * fn.alpha))
    if fn.activation == "silu" and in_place and not fn.interleaved:
        return F.silu(gate, inplace=True).mul_(up)
    return ACTIVATIONS[fn.activation][0](gate) * up


def recompute(preact: torch.Tensor, fn: ExpertFunction, dim: int = 0) -> torch.Tensor:
    """`apply` as the backward pass computes it (for SiLU from σ(gate), as the SiLU path always has)."""
    if fn.activation == "silu" and fn.gated:
        gate, up = split_gate_up(preact, fn, dim)
        return gate * torch.sigmoid(gate) * up
    return apply(preact, fn, dim=dim)


def backward(preact: torch.Tensor, grad_act: torch.Tensor, fn: ExpertFunction, dim: int = 0) -> torch.Tensor:
    """d(loss)/d(preact) from d(loss)/d(activation), same layout as `apply`'s input."""
    if not fn.gated:
        return grad_act * ACTIVATIONS[fn.activation][1](preact)
    gate, up = split_gate_up(preact, fn, dim)
    if fn.activation == SWIGLU_OAI:
        gate_c, up_c = gate.clamp(max=fn.limit), up.clamp(-fn.limit, fn.limit)
        sig = torch.sigmoid(gate_c * fn.alpha)
        glu = gate_c * sig
        d_gate = grad_act * (up_c + 1) * (sig + fn.alpha * gate_c * sig * (1 - sig)) * (gate <= fn.limit)
        d_up = grad_act * glu * ((up >= -fn.limit) & (up <= fn.limit))
        return join_gate_up(d_gate, d_up, fn, dim)
    if fn.activation == "silu":  # the explicit formula the SiLU path has always used
        sig = torch.sigmoid(gate)
        silu = gate * sig
        return join_gate_up(grad_act * up * sig * (1 + gate * (1 - sig)), grad_act * silu, fn, dim)
    act, act_grad = ACTIVATIONS[fn.activation]
    return join_gate_up(grad_act * up * act_grad(gate), grad_act * act(gate), fn, dim)
