"""transformers integration: `experts_implementation="moekit"` runs transformers' fused experts through moekit.

transformers 5 keeps MoE experts as 3D parameters (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) and
looks their forward up by name in `ExpertsInterface`, as fn(self, hidden_states, top_k_index, top_k_weights).
We register one such function. transformers 4.x has no `ExpertsInterface`: registration is then a no-op.

Importing transformers costs seconds, and `import moekit` (the merge CLI) should not pay for it. So when
transformers' MoE module is not loaded yet, registration waits for it with an import hook and happens the
moment transformers loads it (which `from_pretrained` always does first).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_HF_MOE_MODULE = "transformers.integrations.moe"
NAME = "moekit"


def moekit_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' experts signature on top of `moe_forward`; other expert layouts fall back to grouped_mm."""
    from moekit.runtime.experts import moe_forward

    reason = _unsupported_reason(self)
    if reason is not None:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        warnings.warn(
            f"moekit experts: {reason}; using transformers' grouped_mm for {type(self).__name__}",
            stacklevel=2,
        )
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)
    return moe_forward(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)


def _unsupported_reason(experts) -> str | None:
    """Why this experts module is outside moekit's contract (concatenated SwiGLU, no bias, [E, out, in])."""
    import torch
    from transformers.integrations import moe

    default_gate = getattr(moe, "_default_apply_gate", None)
    if not getattr(experts, "has_gate", True) or not hasattr(experts, "gate_up_proj"):
        return "experts without a gate projection"
    if getattr(experts, "has_bias", False):
        return "experts with biases"
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
        return "transposed or interleaved gate_up_proj layout"
    if getattr(experts, "has_post_expert_norm", False):
        return "a post-expert norm"
    if getattr(type(experts), "_apply_gate", default_gate) is not default_gate:
        return "a custom gating function"
    act = getattr(experts, "act_fn", None)
    if not isinstance(act, torch.nn.SiLU) and type(act).__name__ != "SiLUActivation":
        return f"activation {type(act).__name__} (moekit runs SiLU-gated experts)"
    return None


def _register(experts_interface) -> None:
    if experts_interface._global_mapping.get(NAME) is not moekit_experts_forward:
        experts_interface.register(NAME, moekit_experts_forward)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of transformers' MoE module so that loading it registers us."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HF_MOE_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            if hasattr(module, "ExpertsInterface"):
                _register(module.ExpertsInterface)

        spec.loader.exec_module = exec_module
        return spec


def register_with_transformers() -> bool:
    """Make `experts_implementation="moekit"` available. Idempotent; safe without transformers or on 4.x.

    Returns True when registered now, False when waiting for transformers' MoE module to be imported or
    when transformers lacks `ExpertsInterface`.
    """
    module = sys.modules.get(_HF_MOE_MODULE)
    if module is not None:
        if not hasattr(module, "ExpertsInterface"):
            return False
        _register(module.ExpertsInterface)
        return True
    if importlib.util.find_spec("transformers") is None:
        return False
    if not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
    return False
