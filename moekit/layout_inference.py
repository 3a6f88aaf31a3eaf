"""A family's layout read from transformers' own modeling code, for every `model_type` the table does not hold.

The model is built from config.json on the meta device: no weights are allocated, nothing is downloaded and no
remote code runs (a model_type transformers does not ship is refused). From it we read:
- the tensors on disk and their shapes: the parameters, without tied copies, passed through transformers' own
  save-time conversion (`revert_weight_conversion`), which turns in-memory fused experts back into the per-expert
  names that checkpoints hold;
- the layer list (the ModuleList with one entry per layer) and its prefix;
- the input and output embeddings (`get_input_embeddings`/`get_output_embeddings`), whether they are tied, and
  the tensors indexed by vocabulary (their weights, and the head's bias);
- the MLP of a layer by role, from its projections' names and shapes;
- fused projections (q/k/v in one tensor, gate and up in one tensor).

Importing transformers costs seconds, so the result is cached under $MOEKIT_CACHE/layouts, keyed by the config
and the transformers version.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from importlib import metadata
from pathlib import Path

from moekit.architectures import Family
from moekit.errors import UserError
from moekit.paths import moekit_cache

CACHE_FORMAT = 1

# Submodules of a decoder layer that hold its feed-forward block.
MLP_MODULES = ("mlp", "ffn", "feed_forward", "block_sparse_moe", "moe")
# Projection names inside a feed-forward block, by role. Which of gate/up a name is also follows from the shapes.
ROLE_NAMES = {
    "gate": ("gate_proj", "w1", "gate"),
    "up": ("up_proj", "w3", "fc1", "c_fc", "dense_h_to_4h", "fc_in", "up"),
    "down": ("down_proj", "w2", "fc2", "c_proj", "dense_4h_to_h", "fc_out", "down"),
    "gate_up": ("gate_up_proj",),
}
FUSED_QKV = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv")
EXPERT_MODULES = ("experts",)
_LAYER_INDEX = re.compile(r"^(.*?\.)(\d+)\.")


def transformers_version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "none"


def cache_dir() -> Path:
    return moekit_cache() / "layouts"


def cache_key(config: dict) -> str:
    blob = json.dumps([CACHE_FORMAT, transformers_version(), config], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def infer_family(config: dict, where: str, use_cache: bool = True) -> Family:
    """The family of `config` as transformers builds it, from the cache when this config was seen before."""
    path = cache_dir() / f"{cache_key(config)}.json"
    if use_cache:
        try:
            return Family.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            pass  # no entry, or one from another moekit: infer again
    fam = _infer(config, where)
    if use_cache:
        _store(path, fam)
    return fam


def _store(path: Path, fam: Family) -> None:
    """Write the cache entry atomically; a cache that cannot be written only costs the next run the inference."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(fam.to_json()))
        os.replace(tmp, path)
    except OSError:
        pass


def build_meta_model(config: dict, where: str):
    """(transformers config, model on the meta device) for `config`; UserError when transformers cannot build it."""
    import torch
    import transformers
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    model_type = config.get("model_type")
    version = transformers.__version__
    if model_type not in CONFIG_MAPPING:
        remote = (
            " (its auto_map names remote code, which moekit never runs)" if config.get("auto_map") else ""
        )
        raise UserError(
            f"{where}: model_type {model_type!r} is not one transformers {version} ships{remote}; moekit can merge "
            "every model type transformers builds"
        )
    cfg_dict = {k: v for k, v in config.items() if k != "auto_map"}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the meta build's init warnings say nothing about the checkpoint
    try:
        cfg = CONFIG_MAPPING[model_type].from_dict(cfg_dict)
        model_cls = _model_class(cfg, AutoModelForCausalLM)
        if model_cls is None:
            raise UserError(
                f"{where}: transformers {version} has no causal language model for model_type {model_type!r}; "
                "moekit merges decoders"
            )
        with torch.device("meta"):
            model = model_cls(cfg)
    except UserError:
        raise
    except Exception as err:  # a config transformers itself rejects: say so in one line
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"{where}: transformers {version} cannot build a {model_type} model from this config ({first})"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return cfg, model


def _model_class(cfg, auto):
    """The class config.json's `architectures` names when transformers has it, else the causal-LM auto class."""
    import transformers

    for name in getattr(cfg, "architectures", None) or []:
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return auto._model_mapping.get(type(cfg), None)


def disk_tensors(model) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape as a checkpoint holds them: parameters without tied copies, converted back to the
    on-disk names by transformers' save-time conversion."""
    from transformers.core_model_loading import revert_weight_conversion

    params = dict(model.named_parameters())  # named_parameters keeps one name per tied parameter
    reverted = revert_weight_conversion(model, params)
    return {name: tuple(t.shape) for name, t in reverted.items()}


def _infer(config: dict, where: str) -> Family:
    cfg, model = build_meta_model(config, where)
    shapes = disk_tensors(model)
    how = (
        f"inferred: {type(model).__name__} built on the meta device by transformers {transformers_version()}"
    )
    if not hasattr(cfg, "num_hidden_layers"):  # composite models (LLaVA, ...) keep it in a sub-config
        subs = [k for k, v in vars(cfg).items() if hasattr(v, "num_hidden_layers")]
        raise UserError(
            f"{where}: {type(model).__name__} ({cfg.model_type}) is a composite model whose layers live in "
            f"{' and '.join(subs) or 'sub-configs'}; moekit merges single-stack causal language models: merge "
            "the language model on its own"
        )
    num_layers = int(cfg.num_hidden_layers)
    layer_list = _layer_list(model, num_layers, where)
    prefix = _disk_layer_prefix(shapes, num_layers, layer_list[0] + ".", where)
    order = [name for name, _ in model.named_parameters()]

    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    input_name = _disk_name(model, f"{names[id(inp)]}.weight", inp.weight, shapes, where)
    output_name = None
    vocab = inp.weight.shape[0]
    embeddings = [input_name]
    if out is not None:
        output_name = _disk_name(model, f"{names[id(out)]}.weight", out.weight, None, where)
        embeddings.append(output_name)
        if getattr(out, "bias", None) is not None:
            bias = _disk_name(model, f"{names[id(out)]}.bias", out.bias, shapes, where)
            if shapes[bias][:1] == (vocab,):
                embeddings.append(bias)

    first_layer = next((i for i, n in enumerate(order) if n.startswith(layer_list[0] + ".")), len(order))
    before = set(order[:first_layer])
    pre_layer = tuple(n for n in shapes if not n.startswith(prefix) and n in before)

    layer0 = layer_list[1][0]
    mlp, is_moe = _mlp_roles(layer0, cfg, shapes, prefix)
    fused = _fused(layer0, shapes, prefix)
    attr = type(cfg).attribute_map
    origin = dict.fromkeys(("layers", "embeddings", "tied", "mlp", "fused", "moe", "shapes"), how)
    if not mlp and not is_moe:
        origin["mlp"] = f"{how}; no gate/up/down projections recognised, so no MoE can be built from it"
    return Family(
        name=cfg.model_type,
        model_types=(cfg.model_type,),
        hf_class=type(model).__name__,
        layer_prefix=prefix,
        num_layers_key=attr.get("num_hidden_layers", "num_hidden_layers"),
        embeddings=tuple(embeddings),
        input_embedding=input_name,
        output_embedding=output_name,
        pre_layer=pre_layer,
        mlp=mlp,
        fused=fused,
        is_moe=is_moe,
        hidden_key=attr.get("hidden_size", "hidden_size"),
        vocab_key=attr.get("vocab_size", "vocab_size"),
        expected_shapes=shapes,
        origin=origin,
    )


def _layer_list(model, num_layers: int, where: str):
    """(name, module) of the ModuleList holding the decoder layers: the one with `num_layers` entries and the most
    parameters (a multimodal model also has vision layers)."""
    import torch

    lists = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == num_layers and name
    ]
    if not lists:
        raise UserError(f"{where}: the model transformers builds has no list of {num_layers} layers")
    return max(lists, key=lambda pair: sum(p.numel() for p in pair[1].parameters()))


def _disk_layer_prefix(shapes: dict, num_layers: int, module_prefix: str, where: str) -> str:
    if any(n.startswith(f"{module_prefix}0.") for n in shapes):
        return module_prefix
    # A conversion renamed the layers on disk: the prefix whose indices cover every layer, on the most tensors.
    counts: dict[str, set[int]] = {}
    hits: dict[str, int] = {}
    for name in shapes:
        m = _LAYER_INDEX.match(name)
        if m:
            counts.setdefault(m.group(1), set()).add(int(m.group(2)))
            hits[m.group(1)] = hits.get(m.group(1), 0) + 1
    full = [p for p, idx in counts.items() if idx == set(range(num_layers))]
    if not full:
        raise UserError(f"{where}: cannot tell which tensors hold the {num_layers} layers")
    return max(full, key=lambda p: hits[p])


def _disk_name(model, name: str, param, shapes: dict | None, where: str) -> str:
    """The name a checkpoint gives the parameter `name` (GPT-NeoX saves its `lm_head` as `embed_out`)."""
    from transformers.core_model_loading import revert_weight_conversion

    disk = next(iter(revert_weight_conversion(model, {name: param})))
    if shapes is not None and disk not in shapes:
        raise UserError(
            f"{where}: the embedding '{disk}' transformers builds is not among the checkpoint's tensors"
        )
    return disk


def _mlp_roles(layer, cfg, shapes: dict, prefix: str) -> tuple[dict[str, str], bool]:
    """(role -> tensor name inside a layer, is_moe) for layer 0's feed-forward block."""
    hidden = getattr(cfg, "hidden_size", None)
    for child_name, child in layer.named_children():
        if child_name not in MLP_MODULES:
            continue
        if any(n in EXPERT_MODULES for n, _ in child.named_children()):
            return {}, True
        roles: dict[str, str] = {}
        for proj_name, proj in child.named_children():
            weight = getattr(proj, "weight", None)
            rest = f"{child_name}.{proj_name}.weight"
            if weight is None or weight.dim() != 2 or f"{prefix}0.{rest}" not in shapes:
                continue
            role = next((r for r, names in ROLE_NAMES.items() if proj_name in names), None)
            if role is not None:
                roles[role] = rest
        if hidden and not _roles_fit(roles, shapes, prefix, hidden):
            return {}, False
        return roles, False
    return {}, False


def _roles_fit(roles: dict[str, str], shapes: dict, prefix: str, hidden: int) -> bool:
    """Whether the roles found by name have the shapes their roles imply ([I, H] in, [H, I] out, or transposed
    for GPT-2's Conv1D)."""
    if "down" not in roles or not ({"up", "gate_up"} & set(roles)):
        return False
    down = shapes[f"{prefix}0.{roles['down']}"]
    return hidden in down


def _fused(layer, shapes: dict, prefix: str) -> dict[str, str]:
    fused = {}
    for name, _ in layer.named_parameters():
        parts = name.split(".")
        if name.endswith(".weight") and f"{prefix}0.{name}" in shapes:
            if parts[-2] in FUSED_QKV:
                fused["qkv"] = name
            elif parts[-2] == "gate_up_proj":
                fused["gate_up"] = name
    return fused
