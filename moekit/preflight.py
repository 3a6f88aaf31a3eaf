"""What `moekit merge` checks before it imports torch, so that a user error comes back in a fraction of a second.

Importing torch costs about 2 s of CPU (far more on a loaded machine), and every user error used to pay it
first. These checks need none of it: the YAML (its syntax, a mapping), a dense config's keys and its models'
and slices' keys (with a "did you mean"), and every model the config names: its directory (after
${MOEKIT_CACHE}, ~ and the config's folder), the adapter directory of a MODEL+ADAPTER reference, the model's
config.json and family, and its safetensors index and headers checked against config.json; a dense config's
merge method and its parameters' names (from the torch-free table merging/method_table.py), an MoE config's keys
and its experts' and upcycle's keys; the output directory (-o or the config's `out:`). Each is the check the
merge itself makes, called earlier, so the message is the same. The rest (parameter values, shapes across models,
MoE settings, LoRA adapters' contents) is checked after the import, as before.
"""

from __future__ import annotations

from pathlib import Path

from moekit.config import (
    DENSE_KEYS,
    MODEL_KEYS,
    SLICE_KEYS,
    SOURCE_KEYS,
    check_keys,
    is_moe_config,
    read_yaml_documents,
)
from moekit.io.checkpoint import Checkpoint
from moekit.io.output_dir import check_output_free, resolve_out
from moekit.merging.method_table import METHOD_FACTS, all_parameter_names, parameter_names
from moekit.merging.registry import unknown_method, unknown_parameter
from moekit.moe.config import EXPERT_KEYS, MOE_KEYS, UPCYCLE_KEYS, UPCYCLE_PROMPT_KEYS
from moekit.paths import split_adapter_ref


def check_merge_config(
    config: str | Path | dict,
    out: str | Path | None = None,
    *,
    force: bool = False,
    dry_run: bool = False,
    allow_pickle: bool = False,
) -> None:
    """Raise the first user error in `config`, or in the output `out` a real run would replace, that can be
    found without torch; return quietly otherwise: the merge's own validation then finds the rest."""
    if out is not None and not dry_run:
        check_output_free(Path(out), force)
    docs, path = read_yaml_documents(config)
    if len(docs) > 1:  # a mergekit-multi config: later documents name outputs that do not exist yet
        return
    raw = docs[0]
    if "adapters" in raw:  # an adapter merge: its checks live with the adapters (moekit.lora.combine)
        return
    name = str(path) if path else "<config>"
    base_dir = path.parent if path else None
    if is_moe_config(raw):
        _check_moe_keys(raw, name)
        refs = _moe_refs(raw, name)
    else:
        refs = _dense_refs(raw, name)
        _check_method(raw, name)
    if out is None and (
        raw.get("out") is None or isinstance(raw["out"], str)
    ):  # else the full check words it
        config_out = resolve_out(None, raw.get("out"), base_dir)
        if not dry_run:
            check_output_free(config_out, force)
    first_seen: dict[str, str] = {}
    for ref, where in refs:
        first_seen.setdefault(ref, where)
    for ref, where in first_seen.items():  # each model once, named where it first appears
        model, _ = split_adapter_ref(ref, base_dir, where)
        Checkpoint.open(model, base_dir, where, allow_pickle).close()


def _dense_refs(raw: dict, name: str) -> list[tuple[str, str]]:
    """(model reference, where) for each model a dense config names, checking the keys on the way. Anything of
    the wrong type is left for the full validation to word."""
    check_keys(raw, DENSE_KEYS, name)
    refs = []
    if isinstance(raw.get("base_model"), str):
        refs.append((raw["base_model"], f"{name}: base_model"))
    for i, entry in enumerate(_entries(raw.get("models"))):
        where = f"{name}: models[{i}]"
        if isinstance(entry, str):
            refs.append((entry, where))
        elif isinstance(entry, dict):
            check_keys(entry, MODEL_KEYS, where)
            if isinstance(entry.get("model"), str):
                refs.append((entry["model"], where))
    for i, entry in enumerate(_entries(raw.get("slices"))):
        where = f"{name}: slices[{i}]"
        check_keys(entry, SLICE_KEYS, where)
        for j, source in enumerate(_entries(entry.get("sources"))):
            check_keys(source, SOURCE_KEYS, f"{where}.sources[{j}]")
            if isinstance(source.get("model"), str):
                refs.append((source["model"], f"{where}.sources[{j}]"))
        if isinstance(entry.get("base_model"), str):
            refs.append((entry["base_model"], f"{where}.base_model"))
    return refs


def _check_method(raw: dict, name: str) -> None:
    """The merge method's name, and the name of every parameter in the blocks registry.check_parameters walks,
    in its order, as it words them (a parameter another method takes is its warning, left to it)."""
    method = raw.get("merge_method")
    if method is None or "modules" in raw:  # no method: the full check words it; modules: compat's own walk
        return
    if not isinstance(method, str) or method not in METHOD_FACTS:
        raise unknown_method(method, METHOD_FACTS, f"{name}: merge_method")
    blocks = [(raw.get("parameters"), f"{name}: parameters")]
    for i, entry in enumerate(_entries(raw.get("models"))):
        if isinstance(entry, dict):
            blocks.append((entry.get("parameters"), f"{name}: models[{i}].parameters"))
    for i, entry in enumerate(_entries(raw.get("slices"))):
        blocks.append((entry.get("parameters"), f"{name}: slices[{i}].parameters"))
        for j, source in enumerate(_entries(entry.get("sources"))):
            blocks.append((source.get("parameters"), f"{name}: slices[{i}].sources[{j}].parameters"))
    takes, any_method = parameter_names(method), all_parameter_names()
    for params, where in blocks:
        for key in params if isinstance(params, dict) else ():
            error = key not in takes and unknown_parameter(method, takes, key, where, any_method)
            if error:
                raise error


def _check_moe_keys(raw: dict, name: str) -> None:
    """The keys of an MoE config, its experts and its upcycle block, as moe/config.parse_moe_config checks them;
    entries of the wrong type are left to it."""
    check_keys(raw, MOE_KEYS, name)
    for key in ("experts", "shared_experts"):
        for i, entry in enumerate(_entries(raw.get(key))):
            check_keys(entry, EXPERT_KEYS, f"{name}: {key}[{i}]")
    upcycle = raw.get("upcycle")
    if isinstance(upcycle, dict):
        check_keys(upcycle, UPCYCLE_KEYS, f"{name}: upcycle")
        for i, entry in enumerate(_entries(upcycle.get("prompts"))):
            check_keys(entry, UPCYCLE_PROMPT_KEYS, f"{name}: upcycle.prompts[{i}]")


def _moe_refs(raw: dict, name: str) -> list[tuple[str, str]]:
    refs = []
    if isinstance(raw.get("base_model"), str):
        refs.append((raw["base_model"], f"{name}: base_model"))
    for key in ("experts", "shared_experts"):
        for i, entry in enumerate(_entries(raw.get(key))):
            if isinstance(entry, dict) and isinstance(entry.get("source_model"), str):
                refs.append((entry["source_model"], f"{name}: {key}[{i}].source_model"))
    return refs


def _entries(value: object) -> list:
    return value if isinstance(value, list) else []
