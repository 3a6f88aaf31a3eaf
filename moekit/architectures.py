"""Model families as data: how tensor names map to layers, embeddings and MLPs.

A merge needs three facts about a family: which tensors belong to layer `i` (to renumber layers in frankenmerges
and to evaluate gradient parameters), which tensors are indexed by vocabulary (to merge models with different
tokenizers), and where the MLP lives (to turn dense MLPs into MoE experts). Everything else is copied by name.

Two sources give those facts. The table below holds the common families: looking one up costs nothing, so a merge
of them never imports transformers. Every other `model_type` that transformers can build is inferred from its
modeling code (moekit.layout_inference: the model built from config.json on the meta device), and the inferred
family also knows every tensor name and shape the config implies. `Family.origin` says where each fact came from.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from moekit.errors import UserError

TABLE = "table"  # Family.origin value for a hand-written fact

# The facts a family holds, as `moekit inspect` names them.
FACTS = ("layers", "embeddings", "tied", "mlp", "fused", "moe", "shapes")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    hf_class: str
    layer_prefix: str = "model.layers."
    num_layers_key: str = "num_hidden_layers"
    # Tensors indexed by vocabulary (input embedding, output head and its bias): re-laid by tokenizer merges.
    embeddings: tuple[str, ...] = ("model.embed_tokens.weight", "lm_head.weight")
    input_embedding: str = "model.embed_tokens.weight"
    output_embedding: str | None = "lm_head.weight"
    # Non-layer tensors that come before the layers (from a frankenmerge's first slice); the rest come after.
    pre_layer: tuple[str, ...] = ("model.embed_tokens.weight",)
    # Dense MLP tensor names inside a layer, by role (gate/up/down, or up/down, or gate_up); empty for MoE families.
    mlp: dict[str, str] = field(default_factory=dict)
    # Projections that hold several roles in one tensor, by what they fuse ("qkv", "gate_up"): names in a layer.
    fused: dict[str, str] = field(default_factory=dict)
    is_moe: bool = False
    hidden_key: str = "hidden_size"
    vocab_key: str = "vocab_size"
    # Every tensor name -> shape that config.json implies (inferred families only; table families check a formula).
    expected_shapes: dict[str, tuple[int, ...]] | None = field(default=None, compare=False, repr=False)
    # fact (see FACTS) -> "table" or a description of the inference that gave it.
    origin: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def layer_re(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.layer_prefix) + r"(\d+)\.(.+)$")

    def layer_of(self, tensor: str) -> tuple[int, str] | None:
        """(layer index, name inside the layer) for a layer tensor, else None."""
        m = self.layer_re.match(tensor)
        return (int(m.group(1)), m.group(2)) if m else None

    def layer_tensor(self, index: int, rest: str) -> str:
        return f"{self.layer_prefix}{index}.{rest}"

    def is_pre_layer(self, tensor: str) -> bool:
        # "embed" keeps the planner's old rule for tensors a table family does not list.
        return tensor in self.pre_layer or "embed" in tensor

    def fact_origin(self, fact: str) -> str:
        return self.origin.get(fact, TABLE)

    def to_json(self) -> dict:
        data = asdict(self)
        if self.expected_shapes is not None:
            data["expected_shapes"] = {k: list(v) for k, v in self.expected_shapes.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> Family:
        data = dict(data)
        for key in ("model_types", "embeddings", "pre_layer"):
            data[key] = tuple(data[key])
        if data.get("expected_shapes") is not None:
            data["expected_shapes"] = {k: tuple(v) for k, v in data["expected_shapes"].items()}
        return cls(**data)

    def implied_shapes(self, config: dict) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape that `config` implies; for a table family, those its formula covers."""
        if self.expected_shapes is not None:
            return dict(self.expected_shapes)
        return _table_shapes(self, config)

    def expects_output_head(self, config: dict) -> bool | None:
        """Whether the checkpoint must hold its own output head: False when tied, None when config.json is silent."""
        if self.output_embedding is None:
            return False
        if self.expected_shapes is not None:
            return self.output_embedding in self.expected_shapes
        tied = config.get("tie_word_embeddings")
        return None if not isinstance(tied, bool) else not tied


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


def family_for_config(config: dict, where: str) -> Family:
    """The family of a model from its config.json contents: from the table, else inferred by transformers."""
    model_type = config.get("model_type")
    fam = table_family(model_type)
    if fam is not None:
        return fam
    if not isinstance(model_type, str) or not model_type:
        raise UserError(f"{where}: no 'model_type'; config.json must name the model's architecture")
    from moekit.layout_inference import infer_family

    return infer_family(config, where)


def table_family(model_type: object) -> Family | None:
    """The FAMILIES row for `model_type`, if any (read at call time: a row is all a new family needs)."""
    return next((fam for fam in FAMILIES if model_type in fam.model_types), None)


def _table_shapes(fam: Family, config: dict) -> dict[str, tuple[int, ...]]:
    """The shapes a Llama-like table family's config.json states: embeddings, head, attention, dense MLP and norms.

    Only keys config.json holds are used (a missing head_dim has a per-family default we do not repeat here)."""

    def key(name: str) -> int | None:
        value = config.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    hidden, vocab, layers = key(fam.hidden_key), key(fam.vocab_key), key(fam.num_layers_key)
    if hidden is None or layers is None:
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    if vocab is not None:
        shapes[fam.input_embedding] = (vocab, hidden)
        if fam.expects_output_head(config) and fam.output_embedding:
            shapes[fam.output_embedding] = (vocab, hidden)
    heads, head_dim = key("num_attention_heads"), key("head_dim")
    kv_heads = key("num_key_value_heads") or heads
    inter = key("intermediate_size")
    for i in range(layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[fam.layer_tensor(i, f"{norm}.weight")] = (hidden,)
        if heads and head_dim:
            attn = {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
            for proj, rows in attn.items():
                shapes[fam.layer_tensor(i, f"self_attn.{proj}_proj.weight")] = (rows, hidden)
            shapes[fam.layer_tensor(i, "self_attn.o_proj.weight")] = (hidden, heads * head_dim)
        if inter and fam.mlp:
            for role, rest in fam.mlp.items():
                shapes[fam.layer_tensor(i, rest)] = (hidden, inter) if role == "down" else (inter, hidden)
    return shapes


def config_key_of(fam: Family, shape_tensor: str) -> str:
    """The config.json keys a table family's expected shape of `shape_tensor` comes from, for error messages."""
    if shape_tensor in fam.embeddings:
        return f"{fam.vocab_key}, {fam.hidden_key}"
    if ".mlp." in shape_tensor:
        return f"intermediate_size, {fam.hidden_key}"
    if "self_attn" in shape_tensor:
        return f"num_attention_heads, num_key_value_heads, head_dim, {fam.hidden_key}"
    return fam.hidden_key


def check_implied_shapes(where: str, config: dict, fam: Family, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor shape config.json implies for the family agrees with the checkpoint's `shapes`, and an untied
    config has its output head: otherwise transformers loads the output with random or unloadable tensors."""
    head = fam.output_embedding
    if fam.expects_output_head(config) and head not in shapes:
        raise UserError(
            f"{where}: the config does not tie the output head to the embedding, but the weights have no '{head}' "
            "(transformers would fill it with random values); set tie_word_embeddings: true if the head is shared, "
            "or restore the head's tensor"
        )
    inferred = fam.expected_shapes is not None
    for name, want in fam.implied_shapes(config).items():
        got = shapes.get(name)
        if got is None:
            if inferred:
                raise UserError(
                    f"{where}: the weights have no tensor '{name}', which a {fam.hf_class} with this config has "
                    "(transformers would fill it with random values); the checkpoint is incomplete or config.json is wrong"
                )
            continue  # a table family's missing tensors are named by the planner, with the config that needs them
        if tuple(got) != tuple(want):
            source = "config.json" if inferred else f"config.json's {config_key_of(fam, name)}"
            raise UserError(
                f"{where}: tensor '{name}' is {list(got)} but {source} implies {list(want)} for a {fam.hf_class}; "
                "fix config.json or re-download the model"
            )
