"""transformers integration: `experts_implementation="moekit"` runs transformers' fused experts through moekit.

transformers 5 keeps MoE experts as 3D parameters (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) and
looks their forward up by name in `ExpertsInterface`, as fn(self, hidden_states, top_k_index, top_k_weights).
We register two: `moekit`, which runs every experts layout and activation transformers uses and refuses
(naming it) what it does not run, and `moekit_or_grouped_mm`, which falls back to grouped_mm there instead. transformers 4.x has no `ExpertsInterface`: registration is then a no-op.

`import moekit` registers them the moment transformers loads its MoE module (`moekit.transformers_io`).
"""

from __future__ import annotations

import sys
import warnings

from moekit.errors import UserError
from moekit.runtime.activations import ExpertFunction
from moekit.runtime.expert_weights import ExpertWeights
from moekit.transformers_io import HF_MOE_MODULE

NAME = "moekit"
FALLBACK_NAME = "moekit_or_grouped_mm"


class UnsupportedExperts(UserError):
    """An experts module computes something moekit does not run (the message names what)."""


def moekit_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' experts signature on top of moekit's experts; an experts module that computes something
    moekit does not run is an error that names it (choose `moekit_or_grouped_mm` to fall back instead)."""
    from moekit.runtime.experts import run_experts

    return run_experts(hidden_states, top_k_index, top_k_weights, expert_weights(self), "auto")


def moekit_or_grouped_mm_forward(self, hidden_states, top_k_index, top_k_weights):
    """`moekit` where it runs the experts module, transformers' `grouped_mm` (with a warning) where not."""
    from moekit.runtime.experts import run_experts

    try:
        weights = expert_weights(self)
    except UnsupportedExperts as error:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        warnings.warn(f"{error}; using transformers' grouped_mm, as asked", stacklevel=2)
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)
    return run_experts(hidden_states, top_k_index, top_k_weights, weights, "auto")


# transformers activation classes (ACT2FN values) -> moekit.runtime.activations names.
_ACTIVATION_CLASSES = {
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_pytorch_tanh",
    "NewGELUActivation": "gelu_pytorch_tanh",
    "FastGELUActivation": "gelu_pytorch_tanh",
    "AccurateGELUActivation": "gelu_pytorch_tanh",
    "QuickGELUActivation": "quick_gelu",
    "ReLU": "relu",
    "ReLUSquaredActivation": "relu2",
    "ReLU6": "relu6",
    "MishActivation": "mish",
    "Hardswish": "hardswish",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "LinearActivation": "linear",
}


def _activation_name(act) -> str:
    name = type(act).__name__
    if name == "ClippedGELUActivation" and (act.min, act.max) == (-10, 10):
        return "gelu_10"
    if name == "LeakyReLU" and act.negative_slope == 0.01:
        return "leaky_relu"
    if name not in _ACTIVATION_CLASSES:
        raise UnsupportedExperts(
            f"moekit experts: activation {name} is not one moekit runs (it runs "
            f"{', '.join(sorted(set(_ACTIVATION_CLASSES.values()) | {'gelu_10', 'leaky_relu', 'swigluoai'}))}); "
            "load with experts_implementation='moekit_or_grouped_mm' to fall back to grouped_mm"
        )
    return _ACTIVATION_CLASSES[name]


def expert_weights(experts) -> ExpertWeights:
    """The `ExpertWeights` of a transformers 5 experts module, as views of its parameters (no copies).

    Raises UnsupportedExperts for what moekit does not compute: a post-expert norm, an unknown custom gate
    or an activation outside `moekit.runtime.activations`."""
    from transformers.integrations import moe

    kind = type(experts).__name__
    if getattr(experts, "has_post_expert_norm", False):
        raise UnsupportedExperts(
            f"moekit experts: {kind} applies a post-expert norm, which moekit does not run"
        )
    gated = getattr(experts, "has_gate", True)
    gate_up = experts.gate_up_proj if gated else experts.up_proj
    down = experts.down_proj
    gate_up_bias = down_bias = None
    if getattr(experts, "has_bias", False):
        gate_up_bias = experts.gate_up_proj_bias if gated else experts.up_proj_bias
        down_bias = experts.down_proj_bias
    if getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    interleaved = not getattr(experts, "is_concatenated", True)
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if gated and apply_gate is not None and apply_gate is not getattr(moe, "_default_apply_gate", None):
        if not _is_gpt_oss_gate(apply_gate):
            raise UnsupportedExperts(
                f"moekit experts: {kind} has its own gating function ({apply_gate.__qualname__}), which moekit "
                "does not run; load with experts_implementation='moekit_or_grouped_mm' to fall back"
            )
        fn = ExpertFunction("swigluoai", True, interleaved, float(experts.alpha), float(experts.limit))
    else:
        fn = ExpertFunction(_activation_name(experts.act_fn), gated, interleaved)
    return ExpertWeights(gate_up, down, gate_up_bias, down_bias, fn)


def _is_gpt_oss_gate(apply_gate) -> bool:
    """gpt-oss's clamped GLU, which moekit runs as "swigluoai"."""
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except ImportError:
        return False
    return apply_gate is GptOssExperts._apply_gate


def _register(experts_interface) -> None:
    for name, forward in ((NAME, moekit_experts_forward), (FALLBACK_NAME, moekit_or_grouped_mm_forward)):
        if experts_interface._global_mapping.get(name) is not forward:
            experts_interface.register(name, forward)


def register_with_transformers() -> bool:
    """Make `experts_implementation="moekit"` available. Idempotent; `moekit.transformers_io` calls it when
    transformers' MoE module loads. Returns False when that module is not loaded, or lacks `ExpertsInterface`
    (transformers 4.x)."""
    module = sys.modules.get(HF_MOE_MODULE)
    if module is None or not hasattr(module, "ExpertsInterface"):
        return False
    _register(module.ExpertsInterface)
    return True
