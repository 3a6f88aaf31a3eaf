"""MoE output architectures as data: which dense families feed them, and the hub's per-expert tensor names.

Every name here is the per-expert ("legacy") layout that transformers 4.x and vLLM load and that transformers 5.x
converts on load (conversion_mapping.py). transformers 5 fuses experts in memory (`experts.gate_up_proj`); writing
those fused names, as mergekit-moe 0.1.5 does for Mixtral and Qwen3-MoE, makes a file that transformers 4.57 loads
without an error but with random experts. We never write them.

Shared expert (Qwen2-MoE): the layer computes  sum_k w_k E_k(x) + sigmoid(g . x) S(x).  With norm_topk_prob the
w_k sum to 1, so identical routed experts reproduce their MLP exactly; the shared term is exact only when it is
constant: g = 0 gives sigmoid(0) = 1/2 for every token. Upcycling therefore writes g = 0, the base MLP as the
shared expert, and every routed expert with its down_proj halved: 1/2 MLP + 1/2 MLP = MLP (halving is exact in
binary floating point).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from moekit.io.output_files import set_config_dtype

ROLES = ("gate", "up", "down")  # the dense MLP's projections, by role (Family.mlp)


@dataclass(frozen=True)
class MoELayout:
    name: str
    display: str
    model_type: str
    hf_class: str
    sources: tuple[str, ...]  # dense families this layout is built from
    block: str  # the MoE block inside a layer
    expert: dict[str, str]  # role -> name inside `{block}.experts.{e}.`
    num_experts_key: str
    shared: bool = False  # Qwen2-MoE: one shared expert with a sigmoid gate
    zero_qkv_bias: bool = False  # q/k/v biases the architecture always has; zeros when the source has none
    attention_biases: bool = False  # whether the architecture can take the source's attention biases

    def router(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def expert_tensor(self, layer: int, expert: int, role: str) -> str:
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{self.expert[role]}"

    def shared_tensor(self, layer: int, role: str) -> str:
        return f"model.layers.{layer}.{self.block}.shared_expert.{_QWEN_EXPERT[role]}"

    def shared_gate(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.shared_expert_gate.weight"


_QWEN_EXPERT = {"gate": "gate_proj.weight", "up": "up_proj.weight", "down": "down_proj.weight"}

LAYOUTS: tuple[MoELayout, ...] = (
    MoELayout(
        "mixtral", "Mixtral", "mixtral", "MixtralForCausalLM", ("llama", "mistral"), "block_sparse_moe",
        {"gate": "w1.weight", "down": "w2.weight", "up": "w3.weight"}, "num_local_experts",
    ),
    MoELayout(
        "qwen2_moe", "Qwen2-MoE", "qwen2_moe", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), "mlp",
        _QWEN_EXPERT, "num_experts", shared=True, zero_qkv_bias=True,
    ),
    MoELayout(
        "qwen3_moe", "Qwen3-MoE", "qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), "mlp",
        _QWEN_EXPERT, "num_experts", attention_biases=True,
    ),
)  # fmt: skip

BY_NAME = {layout.name: layout for layout in LAYOUTS}


def supported_sources() -> str:
    """'llama, mistral (Mixtral, Qwen2-MoE), ...' for error messages."""
    by_family: dict[str, list[str]] = {}
    for layout in LAYOUTS:
        for fam in layout.sources:
            by_family.setdefault(fam, []).append(layout.display)
    return ", ".join(f"{fam} (-> {' or '.join(outs)})" for fam, outs in by_family.items())


def choose_layout(
    family: str, has_shared: bool | None, candidates: tuple[str, ...] | None
) -> MoELayout | None:
    """The output layout for dense `family`: among `candidates` (all when None), one that takes the family and
    has a shared expert exactly when the config gives one (either, for `has_shared=None`: upcycling makes its own).
    Mixtral first, as mergekit prefers it."""
    names = candidates or tuple(BY_NAME)
    for name in names:
        layout = BY_NAME[name]
        if family in layout.sources and has_shared in (None, layout.shared):
            return layout
    return None


def moe_config(
    layout: MoELayout,
    base_config: dict,
    num_experts: int,
    experts_per_token: int,
    expert_intermediate: int,
    shared_intermediate: int | None,
    dtype: torch.dtype,
) -> dict:
    """config.json of the output: the base's config with the MoE keys, readable by transformers 4.57 and 5.x."""
    cfg = copy.deepcopy(base_config)
    for key in ("architectures", "transformers_version", "auto_map", "_name_or_path"):
        cfg.pop(key, None)
    cfg["architectures"] = [layout.hf_class]
    cfg["model_type"] = layout.model_type
    cfg[layout.num_experts_key] = num_experts
    cfg["num_experts_per_tok"] = experts_per_token
    cfg["output_router_logits"] = False
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in cfg:
        # transformers 5 writes rope_parameters only; 4.x reads rope_theta (and rope_scaling) and would otherwise
        # fall back to the architecture's default theta (1e6 for Mixtral) and compute different logits.
        cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if layout.name == "mixtral":
        cfg["intermediate_size"] = expert_intermediate
        cfg["sliding_window"] = None
        cfg.setdefault("router_aux_loss_coef", 0.02)
        cfg.setdefault("router_jitter_noise", 0.0)
    else:
        cfg["moe_intermediate_size"] = expert_intermediate
        cfg["intermediate_size"] = expert_intermediate  # no dense layers (mlp_only_layers is empty)
        cfg["decoder_sparse_step"] = 1
        cfg["mlp_only_layers"] = []
        # The routed weights of the k chosen experts are renormalised to sum to 1, as mergekit sets it; this is what
        # makes copies of one MLP compute that MLP exactly.
        cfg["norm_topk_prob"] = True
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None
        cfg.setdefault("router_aux_loss_coef", 0.001)
        if layout.shared:
            cfg["shared_expert_intermediate_size"] = shared_intermediate
            cfg["qkv_bias"] = True
    for key in ("torch_dtype", "dtype"):
        cfg.setdefault(key, None)
    return set_config_dtype(cfg, dtype)
