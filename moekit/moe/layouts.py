"""MoE output architectures as data: which dense families feed them, and the hub's per-expert tensor names.

Every name here is the per-expert ("legacy") layout that transformers 4.x and vLLM load and that transformers 5.x
converts on load (conversion_mapping.py). transformers 5 fuses experts in memory (`experts.gate_up_proj`); writing
those fused names, as mergekit-moe 0.1.5 does for Mixtral and Qwen3-MoE, makes a file that transformers 4.57 loads
without an error but with random experts. We never write them.

Shared expert (Qwen2-MoE): the layer computes  sum_k w_k E_k(x) + sigmoid(g . x) S(x).  With norm_topk_prob the
w_k sum to 1, so identical routed experts reproduce their MLP exactly; the shared term is exact only when it is
constant: g ~ 0 gives sigmoid = 1/2 for every token. Upcycling therefore writes such a g, the base MLP as the
shared expert, and every routed expert with its down_proj halved: 1/2 MLP + 1/2 MLP = MLP (halving is exact in
binary floating point). g is tiny but not zero (`shared_gate_value`): llama.cpp computes the sigmoid as
silu(t) / t, which is NaN at t = 0.

llama.cpp's Qwen2-MoE also has no fallback from `output.weight` to the token embedding and never renormalises the
top-k weights (it ignores norm_topk_prob); `own_lm_head` and `llama_cpp_differs` hold those two facts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moekit.io.output_files import set_config_dtype

if TYPE_CHECKING:
    import torch

ROLES = ("gate", "up", "down")  # the dense MLP's projections, by role (Family.mlp)


@dataclass(frozen=True)
class MoELayout:
    """Every fact about one MoE output family: what feeds it, its tensor names and its config.json keys."""

    name: str
    display: str
    model_type: str
    hf_class: str
    sources: tuple[
        str, ...
    ]  # dense families this layout is built from, each tested exact (tests/test_moe_pairs.py)
    block: str  # the MoE block inside a layer
    expert: dict[str, str]  # role -> name inside `{block}.experts.{e}.`
    num_experts_key: str
    top_k_key: str = "num_experts_per_tok"
    expert_size_keys: tuple[str, ...] = ("moe_intermediate_size", "intermediate_size")  # = the expert's size
    settings: dict = field(default_factory=dict)  # config keys set to these values, in this order
    defaults: dict = field(default_factory=dict)  # config keys set when the base has none
    last_layer_key: str | None = None  # a key that must name the last layer for every layer to be MoE
    zero_tensors: tuple[str, ...] = ()  # [1, experts] tensors in the block that are zero (routing biases)
    aliases: tuple[str, ...] = ()  # other spellings of `architecture:` (mergekit's display-name prefixes)
    shared: bool = False  # Qwen2-MoE: one shared expert with a sigmoid gate
    zero_qkv_bias: bool = False  # q/k/v biases the architecture always has; zeros when the source has none
    attention_biases: bool = False  # whether the architecture can take the source's attention biases
    own_lm_head: bool = False  # llama.cpp needs lm_head.weight even when the base ties it to the embedding

    def router(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def expert_tensor(self, layer: int, expert: int, role: str) -> str:
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{self.expert[role]}"

    def shared_tensor(self, layer: int, role: str) -> str:
        return f"model.layers.{layer}.{self.block}.shared_expert.{_QWEN_EXPERT[role]}"

    def shared_gate(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.shared_expert_gate.weight"

    def zero_tensor(self, layer: int, rest: str) -> str:
        return f"model.layers.{layer}.{self.block}.{rest}"


_QWEN_EXPERT = {"gate": "gate_proj.weight", "up": "up_proj.weight", "down": "down_proj.weight"}
# Qwen-MoE's routed weights of the k chosen experts are renormalised to sum to 1, as mergekit sets it: this is what
# makes copies of one MLP compute that MLP exactly. No dense layers (mlp_only_layers is empty).
_QWEN_SETTINGS = {
    "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "use_sliding_window": False,
    "sliding_window": None,
}  # fmt: skip

LAYOUTS: tuple[MoELayout, ...] = (
    MoELayout(
        "mixtral", "Mixtral", "mixtral", "MixtralForCausalLM", ("llama", "mistral"), "block_sparse_moe",
        {"gate": "w1.weight", "down": "w2.weight", "up": "w3.weight"}, "num_local_experts",
        expert_size_keys=("intermediate_size",), settings={"sliding_window": None},
        defaults={"router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0},
    ),
    MoELayout(
        "qwen2_moe", "Qwen2-MoE", "qwen2_moe", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), "mlp",
        _QWEN_EXPERT, "num_experts", settings=_QWEN_SETTINGS, defaults={"router_aux_loss_coef": 0.001},
        aliases=("qwen", "qwen moe"), shared=True, zero_qkv_bias=True, own_lm_head=True,
    ),
    MoELayout(
        "qwen3_moe", "Qwen3-MoE", "qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), "mlp",
        _QWEN_EXPERT, "num_experts", settings=_QWEN_SETTINGS, defaults={"router_aux_loss_coef": 0.001},
        aliases=("qwen", "qwen3", "qwen3 moe"), attention_biases=True,
    ),
    # ERNIE-4.5-MoE: softmax router, top-k picked after a zero correction bias, weights renormalised (exact).
    MoELayout(
        "ernie4_5_moe", "ERNIE-4.5-MoE", "ernie4_5_moe", "Ernie4_5_MoeForCausalLM", ("ernie4_5",), "mlp",
        _QWEN_EXPERT, "moe_num_experts", top_k_key="moe_k", expert_size_keys=("moe_intermediate_size",),
        settings={"moe_num_shared_experts": 0, "moe_layer_start_index": 0, "moe_layer_interval": 1},
        defaults={"router_aux_loss_coef": 0.001}, last_layer_key="moe_layer_end_index",
        zero_tensors=("moe_statics.e_score_correction_bias",), aliases=("ernie",),
    ),
)  # fmt: skip

# Dense -> MoE pairs transformers ships that moekit does not build: output -> (dense sources, why). Each was tried
# by the exactness test (identical experts must give the dense logits) or fails it by construction.
NOT_BUILT: dict[str, tuple[tuple[str, ...], str]] = {
    "olmoe": (("olmo",), "OLMoE normalises q and k (q_norm/k_norm) and its layer norms have weights where OLMo's "
              "have none, so no OLMoE computes what an OLMo model computes"),
    "glm4_moe": (("glm4",), "GLM-4 layers have post-attention and post-MLP norms (post_self_attn_layernorm, "
                 "post_mlp_layernorm) that GLM-4-MoE layers lack, so no GLM-4-MoE computes what a GLM-4 model computes"),
    "granitemoe": (("granite",), "GraniteMoE stores its experts stacked (block_sparse_moe.input_linear [E, 2I, H]), "
                   "a layout moekit does not write; only per-expert layouts are built"),
    "hunyuan_v1_moe": (("hunyuan_v1_dense",), "HunYuan-MoE always runs a shared MLP next to the routed experts and "
                       "names its router gate.wg; it is not tested exact against HunYuan dense, so it is not built"),
    "lfm2_moe": (("lfm2",), "LFM2-MoE keeps its first layers dense and routes by sigmoid scores plus a bias; it is "
                 "not tested exact against LFM2, so it is not built"),
    "phimoe": (("phi", "phi3"), "Phi-3.5-MoE's experts are SwiGLU while Phi-2's MLP is fc1/gelu/fc2 (Phixtral's "
               "phi-2 experts need remote code), and Phi-3's fused gate_up_proj is not split into PhiMoE experts"),
}  # fmt: skip


def not_built_sibling(family: str) -> str | None:
    """The MoE output that `family` would become but that NOT_BUILT refuses, if any."""
    return next((out for out, (sources, _) in NOT_BUILT.items() if family in sources), None)


# sigmoid(t) rounds to exactly 1/2 in float32 for |t| < 2**-25, and |g . x| <= 1e-30 * sum|x| is far below that for
# any finite hidden state; float16 cannot hold 1e-30, so there its smallest subnormal (2**-24) stands in: then
# |t| stays below float16's half-ulp at 1/2 (2**-12) while sum|x| < 2**10.
SHARED_GATE_VALUE = 1e-30


def shared_gate_value(dtype: torch.dtype) -> float:
    """The entries of a constant shared-expert gate: sigmoid(g . x) = 1/2 to working precision, yet g != 0."""
    import torch

    subnormal = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return max(SHARED_GATE_VALUE, subnormal)


def llama_cpp_differs(layout: MoELayout, num_experts: int, experts_per_token: int) -> str | None:
    """A one-line warning when llama.cpp computes something else than transformers for this output, else None."""
    if layout.name == "qwen2_moe" and experts_per_token < num_experts:
        return (
            f"llama.cpp ignores norm_topk_prob for Qwen2-MoE: with {experts_per_token} of {num_experts} experts per "
            "token its outputs (GGUF, Ollama, LM Studio) will differ from transformers'; use Mixtral for llama.cpp, "
            "or experts_per_token = num_experts"
        )
    return None


def architecture_names() -> dict[str, tuple[str, ...]]:
    """`architecture:` value (lower case) -> candidate layout names, mergekit's spellings included."""
    names: dict[str, list[str]] = {}
    for layout in LAYOUTS:
        for alias in (layout.name, *layout.aliases):
            names.setdefault(alias, []).append(layout.name)
    return {k: tuple(v) for k, v in names.items()}


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
    for layout in LAYOUTS:  # read at call time: a row is all a new output family needs
        if candidates and layout.name not in candidates:
            continue
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
    cfg[layout.top_k_key] = experts_per_token
    cfg["output_router_logits"] = False
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in cfg:
        # transformers 5 writes rope_parameters only; 4.x reads rope_theta (and rope_scaling) and would otherwise
        # fall back to the architecture's default theta (1e6 for Mixtral) and compute different logits.
        cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    for key in layout.expert_size_keys:
        cfg[key] = expert_intermediate
    cfg.update(copy.deepcopy(layout.settings))
    if layout.last_layer_key:
        cfg[layout.last_layer_key] = cfg.get("num_hidden_layers", 1) - 1
    for key, value in layout.defaults.items():
        cfg.setdefault(key, value)
    if layout.shared:
        cfg["shared_expert_intermediate_size"] = shared_intermediate
        cfg["qkv_bias"] = True
    if layout.own_lm_head:
        cfg["tie_word_embeddings"] = False  # lm_head.weight is written (build.py), a copy of a tied embedding
    for key in ("torch_dtype", "dtype"):
        cfg.setdefault(key, None)
    return set_config_dtype(cfg, dtype)
