"""Model families as data: how tensor names map to layers, embeddings and MLPs.

A merge needs three facts about a family: which tensors belong to layer `i` (to renumber layers in frankenmerges
and to evaluate gradient parameters), which tensors are indexed by vocabulary (to merge models with different
tokenizers), and where the MLP lives (to turn dense MLPs into MoE experts). Everything else is copied by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from moekit.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    hf_class: str
    layer_prefix: str = "model.layers."
    num_layers_key: str = "num_hidden_layers"
    embeddings: tuple[str, ...] = ("model.embed_tokens.weight", "lm_head.weight")
    # Dense MLP tensor names inside a layer, by role; empty for MoE families.
    mlp: dict[str, str] = field(default_factory=dict)
    is_moe: bool = False

    @property
    def layer_re(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.layer_prefix) + r"(\d+)\.(.+)$")

    def layer_of(self, tensor: str) -> tuple[int, str] | None:
        """(layer index, name inside the layer) for a layer tensor, else None."""
        m = self.layer_re.match(tensor)
        return (int(m.group(1)), m.group(2)) if m else None

    def layer_tensor(self, index: int, rest: str) -> str:
        return f"{self.layer_prefix}{index}.{rest}"


_LLAMA_MLP = {"gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"}

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), "LlamaForCausalLM", mlp=_LLAMA_MLP),
    Family("mistral", ("mistral",), "MistralForCausalLM", mlp=_LLAMA_MLP),
    Family("qwen2", ("qwen2",), "Qwen2ForCausalLM", mlp=_LLAMA_MLP),
    Family("qwen3", ("qwen3",), "Qwen3ForCausalLM", mlp=_LLAMA_MLP),
    Family("gemma", ("gemma",), "GemmaForCausalLM", mlp=_LLAMA_MLP),
    Family("gemma2", ("gemma2",), "Gemma2ForCausalLM", mlp=_LLAMA_MLP),
    Family("gemma3_text", ("gemma3_text",), "Gemma3ForCausalLM", mlp=_LLAMA_MLP),
    Family("olmo2", ("olmo2",), "Olmo2ForCausalLM", mlp=_LLAMA_MLP),
    Family("mixtral", ("mixtral",), "MixtralForCausalLM", is_moe=True),
    Family("qwen2_moe", ("qwen2_moe",), "Qwen2MoeForCausalLM", is_moe=True),
    Family("qwen3_moe", ("qwen3_moe",), "Qwen3MoeForCausalLM", is_moe=True),
)

_BY_MODEL_TYPE = {mt: fam for fam in FAMILIES for mt in fam.model_types}


def family_for_config(config: dict, where: str) -> Family:
    """The family of a model from its config.json contents."""
    model_type = config.get("model_type")
    fam = _BY_MODEL_TYPE.get(model_type)
    if fam is None:
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise UserError(f"{where}: model_type {model_type!r} is not supported; supported: {known}")
    return fam


def family_by_name(name: str) -> Family | None:
    return next((f for f in FAMILIES if f.name == name), None)
