"""A PEFT LoRA adapter directory: its config, and which base tensor each of its tensors changes, and how.

PEFT saves an adapter as `adapter_config.json` and `adapter_model.safetensors`, with tensor names
`base_model.model.<module>.lora_A.weight` (and `lora_B`, `lora_embedding_A/B`, `lora_magnitude_vector`,
`lora_B.bias`). Anything else under `base_model.model.` is a full tensor that replaces the base's: the
`modules_to_save`, trained biases (`bias: all`), and embeddings saved as `<module>.base_layer.weight`.
The update of one weight is PEFT's `merge_and_unload()`:
  LoRA:      W + s·B·A               with s = alpha/r, or alpha/sqrt(r) for rsLoRA
  embedding: W + s·(B·A)ᵀ
  DoRA:      m/‖W + s·B·A‖_row · (W + s·B·A)
r and alpha per module come from `rank_pattern` / `alpha_pattern` when those name it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.errors import UserError
from moekit.io.safetensors_reader import TensorReader, read_header, safe_child
from moekit.paths import read_json_object

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# PEFT options that change what the adapter computes and that moekit does not implement, with their "off" value.
_UNSUPPORTED_OPTIONS = {
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "target_parameters": None,
    "megatron_config": None,
}
# Initialisations that rewrite the base weights when the adapter is loaded, so the factors are not a delta on W.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_FACTOR_SUFFIXES = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_embedding_A": "a",
    ".lora_embedding_B": "b",
    ".lora_B.bias": "bias",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}


@dataclass
class LoraFactors:
    """The low-rank update of one base weight: tensor names in the adapter file and the scale."""

    module: str
    a: str | None = None
    b: str | None = None
    bias: str | None = None
    magnitude: str | None = None
    embedding: bool = False
    scaling: float = 1.0
    rank: int = 0

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"


@dataclass
class LoraAdapter:
    """An opened adapter: the factors per base weight, the full tensors that replace base ones, and a reader."""

    path: Path
    config: dict
    factors: dict[str, LoraFactors]  # base weight name -> its factors
    replacements: dict[str, str]  # base tensor name -> adapter tensor name
    tensors: TensorReader

    @property
    def lora_bias(self) -> bool:
        return bool(self.config.get("lora_bias", False))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora", False))

    def close(self) -> None:
        self.tensors.close()


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json, checked to describe a LoRA that moekit computes exactly as PEFT does."""
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{adapter_dir}: not a LoRA adapter (no {CONFIG_NAME})")
    config = read_json_object(path)
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise UserError(f"{path}: peft_type is {kind!r}; moekit reads LoRA adapters only (peft_type LORA)")
    for key, off in _UNSUPPORTED_OPTIONS.items():
        value = config.get(key, off)
        if value not in (off, False, None, [], {}):
            raise UserError(
                f"{path}: '{key}' is set ({str(value)[:40]}); moekit does not implement it: merge this adapter "
                "with PEFT's merge_and_unload() first"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise UserError(
            f"{path}: init_lora_weights is '{init}', which changes the base weights when the adapter loads; "
            "convert it to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)"
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{path}: '{key}' must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise UserError(f"{path}: '{key}' must be a mapping of module pattern: number")
    return config


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches a suffix of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's scale of B·A: alpha/r, or alpha/sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def open_adapter(adapter_dir: Path, base_names: set[str] | None = None) -> LoraAdapter:
    """Read an adapter and map every tensor in it to the base tensor it changes; errors name the tensor.

    Without `base_names` (merging adapters, no base model at hand) the names are taken as they are."""
    config = read_adapter_config(adapter_dir)
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        held = sorted(p.name for p in adapter_dir.glob("adapter_model.*"))
        hint = f" ({held[0]} holds pickled weights: save the adapter with safetensors)" if held else ""
        raise UserError(f"{adapter_dir}: no {WEIGHTS_NAME}{hint}")
    safe_child(adapter_dir, WEIGHTS_NAME, str(adapter_dir))
    infos = read_header(weights)
    factors: dict[str, LoraFactors] = {}
    replacements: dict[str, str] = {}
    for name in infos:
        where = f"{weights}: tensor '{name}'"
        if not name.startswith(PREFIX):
            raise UserError(
                f"{where} does not start with '{PREFIX}'; not a PEFT LoRA adapter for a causal LM"
            )
        inner = name[len(PREFIX) :]
        part = next((s for s in _FACTOR_SUFFIXES if inner.endswith(s)), None)
        if part is None:
            target = inner.replace(".base_layer.", ".")
            if base_names is not None and target not in base_names:
                raise UserError(f"{where}: the base model has no tensor '{target}' for it to replace")
            replacements[target] = name
            continue
        module = inner[: -len(part)]
        f = factors.setdefault(f"{module}.weight", LoraFactors(module))
        setattr(f, _FACTOR_SUFFIXES[part], name)
        f.embedding = f.embedding or "embedding" in part
    adapter = LoraAdapter(adapter_dir, config, factors, replacements, TensorReader(infos))
    for f in factors.values():
        _complete(adapter, f, base_names)
    return adapter


def _complete(adapter: LoraAdapter, f: LoraFactors, base_names: set[str] | None) -> None:
    """Check one module's factors against each other and the config, and set its rank and scale."""
    where = f"{adapter.path / WEIGHTS_NAME}: module '{f.module}'"
    if f.a is None or f.b is None:
        raise UserError(f"{where} has {'lora_B' if f.a is None else 'lora_A'} but not its partner")
    if base_names is not None and f.weight_name not in base_names:
        raise UserError(
            f"{where}: the base model has no tensor '{f.weight_name}'; is this adapter for another model?"
        )
    infos = adapter.tensors.infos
    a, b = infos[f.a].shape, infos[f.b].shape
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise UserError(
            f"{where}: lora_A {list(a)} and lora_B {list(b)} do not multiply (A is r x in, B is out x r)"
        )
    config = adapter.config
    rank = pattern_value(config.get("rank_pattern") or {}, f.module, config["r"])
    if rank != a[0]:
        raise UserError(f"{where}: adapter_config.json gives r={rank} but lora_A has {a[0]} rows")
    if f.magnitude is not None and (f.embedding or adapter.fan_in_fan_out):
        raise UserError(f"{where}: DoRA on embeddings or fan_in_fan_out layers is not implemented")
    if f.magnitude is None and adapter.use_dora and not f.embedding:
        raise UserError(f"{where}: use_dora is set but the adapter has no lora_magnitude_vector for it")
    alpha = pattern_value(config.get("alpha_pattern") or {}, f.module, config["lora_alpha"])
    f.rank = rank
    f.scaling = lora_scaling(alpha, rank, bool(config.get("use_rslora", False)))


def lora_delta(
    adapter: LoraAdapter,
    f: LoraFactors,
    rows: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """s·B·A (or its transpose for embeddings and fan_in_fan_out), in `dtype`, only `rows` of it if given."""
    a = adapter.tensors.read(f.a).to(dtype)
    b = adapter.tensors.read(f.b).to(dtype)
    if f.embedding or adapter.fan_in_fan_out:
        # The weight is stored (in, out) relative to B·A, so its rows are columns of A.
        if rows is not None:
            a = a[:, rows[0] : rows[1]]
        return (b @ a).T * f.scaling
    if rows is not None:
        b = b[rows[0] : rows[1]]
    return (b @ a) * f.scaling
