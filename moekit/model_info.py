"""`moekit inspect MODEL`: what moekit knows about a model directory, and where each fact came from.

Architecture and family, the layer list, embeddings (tied or not, which tensors are indexed by vocabulary), the
MLP by role, fused projections, the MoE layout of an MoE checkpoint, dtypes, sizes and the tokenizer. For a table
family the table's facts are also compared with what transformers' modeling code gives (when transformers is
installed), so the output says whether the table and the code agree.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from moekit.architectures import FACTS, Family
from moekit.errors import UserError
from moekit.io.checkpoint import Checkpoint

_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.")
_FACT_FIELDS = {
    "layers": ("layer_prefix", "num_layers_key", "pre_layer"),
    "embeddings": ("embeddings", "input_embedding", "output_embedding"),
    "mlp": ("mlp",),
    "fused": ("fused",),
    "moe": ("is_moe",),
}


def describe_model(model_dir: str | Path, compare_with_inference: bool = True) -> list[str]:
    """The report's lines. UserError (one line) for a directory moekit cannot read."""
    ckpt = Checkpoint.open(str(model_dir), where=str(model_dir))
    try:
        return _lines(ckpt, compare_with_inference)
    finally:
        ckpt.close()


def _lines(ckpt: Checkpoint, compare: bool) -> list[str]:
    fam, cfg, infos = ckpt.family, ckpt.config, ckpt.tensors.infos
    archs = ", ".join(map(str, cfg.get("architectures") or [])) or "(none in config.json)"
    lines = [
        f"model: {ckpt.path}",
        f"architecture: {archs}; model_type {cfg.get('model_type')!r}",
        f"family: {fam.name} ({fam.hf_class}), {'MoE' if fam.is_moe else 'dense'}",
    ]
    agreement = _agreement(fam, cfg) if compare and fam.fact_origin("layers") == "table" else {}
    lines.append("facts (and where they come from):")
    n_layers = ckpt.num_layers
    tied = fam.output_embedding not in infos
    rows = {
        "layers": f"{n_layers} layers under '{fam.layer_prefix}N.' (count in config.json '{fam.num_layers_key}')",
        "embeddings": f"input '{fam.input_embedding}', output '{fam.output_embedding}'; vocabulary-indexed: "
        + ", ".join(n for n in fam.embeddings if n in infos),
        "tied": "yes: the output head is the input embedding"
        if tied
        else "no: the checkpoint has its own head",
        "mlp": ", ".join(f"{role} '{name}'" for role, name in fam.mlp.items())
        or "(none: MoE, or not recognised)",
        "fused": ", ".join(f"{what} '{name}'" for what, name in fam.fused.items()) or "none",
        "moe": _moe_line(fam, cfg, infos),
        "shapes": f"every shape config.json implies matches the {len(infos)} tensors"
        + (
            ""
            if fam.expected_shapes is not None
            else " (the table's formula: embeddings, attention, MLP, norms)"
        ),
    }
    for fact in FACTS:
        origin = fam.fact_origin(fact)
        if fact in agreement:
            origin += f"; {agreement[fact]}"
        lines.append(f"  {fact}: {rows[fact]}  [{origin}]")
    dtypes = Counter(str(i.dtype).removeprefix("torch.") for i in infos.values())
    numel = sum(i.numel for i in infos.values())
    nbytes = sum(i.numel * i.dtype.itemsize for i in infos.values())
    lines.append("dtypes: " + ", ".join(f"{d} ({n} tensors)" for d, n in dtypes.most_common()))
    lines.append(f"size: {len(infos)} tensors, {numel:,} parameters, {nbytes / 1024**3:.3f} GiB")
    lines.append("tokenizer: " + _tokenizer_line(ckpt.path))
    return lines


def _agreement(fam: Family, cfg: dict) -> dict[str, str]:
    """fact -> 'agrees with ...' or 'differs from ...' for a table family, when transformers can say."""
    try:
        from moekit.layout_inference import infer_family

        inferred = infer_family(cfg, "inspect")
    except (ImportError, UserError):
        return {}
    out = {}
    for fact, fields in _FACT_FIELDS.items():
        differs = [f for f in fields if _norm(getattr(fam, f)) != _norm(getattr(inferred, f))]
        out[fact] = (
            "agrees with transformers' modeling code"
            if not differs
            else f"differs from transformers' modeling code in {', '.join(differs)}"
        )
    return out


def _norm(value):
    return sorted(value) if isinstance(value, tuple) else value


def _moe_line(fam: Family, cfg: dict, infos: dict) -> str:
    if not fam.is_moe:
        return "dense"
    experts: dict[str, set[int]] = {}
    for name in infos:
        m = _EXPERT.match(name)
        if m:
            loc = fam.layer_of(m.group(1) + ".x")
            block = loc[1].removesuffix(".x") if loc else m.group(1)
            experts.setdefault(block, set()).add(int(m.group(2)))
    keys = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    declared = next((cfg[k] for k in keys if isinstance(cfg.get(k), int)), None)
    top_k = next((cfg[k] for k in ("num_experts_per_tok", "moe_k") if isinstance(cfg.get(k), int)), None)
    moe_layers = len({fam.layer_of(n)[0] for n in infos if ".experts." in n and fam.layer_of(n)})
    blocks = (
        ", ".join(f"'{b}.experts.E' ({len(e)} experts)" for b, e in experts.items()) or "fused expert tensors"
    )
    shared = any("shared_expert" in n for n in infos)
    return f"{declared} experts, {top_k} per token, in {moe_layers} layers: {blocks}" + (
        "; with a shared expert" if shared else ""
    )


def _tokenizer_line(path: Path) -> str:
    tok_json = path / "tokenizer.json"
    cfg_json = path / "tokenizer_config.json"
    if not tok_json.is_file() and not cfg_json.is_file():
        return "none (no tokenizer.json or tokenizer_config.json)"
    parts = []
    try:
        if cfg_json.is_file():
            cls = json.loads(cfg_json.read_text()).get("tokenizer_class")
            parts.append(f"class {cls}")
        if tok_json.is_file():
            data = json.loads(tok_json.read_text())
            model = data.get("model") or {}
            vocab = model.get("vocab")
            parts.append(f"{model.get('type', '?')} with {len(vocab) if vocab is not None else '?'} tokens")
            parts.append(f"{len(data.get('added_tokens') or [])} added tokens")
    except (OSError, ValueError, AttributeError) as err:
        return f"unreadable ({err})"
    return ", ".join(parts)
