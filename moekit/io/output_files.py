"""Everything in an output directory besides the weights: config, generation config, tokenizer, model card."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from moekit._version import __version__

if TYPE_CHECKING:
    import torch

    from moekit.io.checkpoint import Checkpoint
    from moekit.options import MergeOptions

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

MARKER_NAME = (
    "moekit_config.yaml"  # the recipe: it also marks a directory as moekit's, which --force may replace
)

RERUN_NAME = "moekit_rerun.yaml"  # what a rerun of the recipe needs besides it: the seed, the config's folder
# The merge options, besides the seed, that change the tensors a config makes (or whether it runs at all).
RERUN_OPTIONS = ("allow_crimes", "unsafe_truncate_embeddings", "gate_dtype")

CONFIG_DTYPES = ("float32", "float16", "bfloat16", "float64")  # the dtypes config.json may name


def set_config_dtype(config: dict, dtype: torch.dtype) -> dict:
    """Record the weights' dtype under the key(s) the source used (`torch_dtype` in 4.x, `dtype` in 5.x)."""
    name = str(dtype).removeprefix("torch.")  # without importing torch: the CLI imports this module before it
    if name not in CONFIG_DTYPES:
        return config
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    for k in keys:
        config[k] = name
    return config


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files that `src` has; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        f = src / name
        if f.is_file():
            shutil.copyfile(f, dst / name)
            copied.append(name)
    return copied


def copy_generation_config(sources: list[Path], dst: Path) -> None:
    for src in sources:
        f = src / "generation_config.json"
        if f.is_file():
            shutil.copyfile(f, dst / "generation_config.json")
            return


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_name(model: Checkpoint) -> str:
    """The name a model goes by on a hub card: the hub id its config.json records (`_name_or_path`), else its
    directory's name; never a local path, which would leak the machine's layout and mean nothing elsewhere."""
    recorded = model.config.get("_name_or_path")
    if isinstance(recorded, str) and _HUB_ID.fullmatch(recorded) and not Path(recorded).exists():
        return recorded
    return model.path.resolve().name


def _named(value: object, names: dict[str, str]) -> object:
    if isinstance(value, str):
        return names.get(value, value)
    if isinstance(value, list):
        return [_named(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _named(v, names) for k, v in value.items()}
    return value


def write_recipe(
    dst: Path,
    raw_config: dict,
    title: str,
    summary_lines: list[str],
    models: list[Checkpoint],
    *,
    moe: bool,
    model_card: bool = True,
) -> None:
    """moekit_config.yaml (the config, as given) and, unless `model_card` is off, a README.md model card for the
    hub: metadata front matter, and the config quoted with each model reference replaced by the model's name."""
    text = yaml.safe_dump(raw_config, sort_keys=False)
    (dst / MARKER_NAME).write_text(text)
    if not model_card:
        return
    names = {m.ref: hub_name(m) for m in models}
    metadata = {
        "base_model": list(dict.fromkeys(names.values())),
        "base_model_relation": "merge",
        "library_name": "transformers",  # the output loads with transformers; the hub knows no moekit library
        "pipeline_tag": "text-generation",
        "tags": ["merge", "moekit"] + (["moe"] if moe else []),
    }
    body = "\n".join(f"- {_named_refs(line, names)}" for line in summary_lines)
    card = (
        f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n"
        f"# {title}\n\n"
        f"This model was made with moekit {__version__}.\n\n"
        f"{body}\n\n"
        "## Configuration\n\nThe config that produced it (also saved as `moekit_config.yaml`, with the models' "
        "local paths):\n\n"
        f"```yaml\n{yaml.safe_dump(_named(raw_config, names), sort_keys=False)}```\n"
    )
    (dst / "README.md").write_text(card)


def write_rerun_record(dst: Path, out: Path, base_dir: Path | None, options: MergeOptions) -> None:
    """moekit_rerun.yaml: the seed, the options of RERUN_OPTIONS that are not their defaults, and the folder the
    recipe's relative paths resolved against (the config's folder; the working directory for a config given as
    a dict or text), written relative to the final output `out`, so that an uploaded folder carries no absolute
    local path and `moekit verify` finds the inputs of an output moved with them."""
    base = (base_dir if base_dir is not None else Path()).resolve()
    record: dict = {
        "seed": options.seed,
        "paths_relative_to": Path(os.path.relpath(base, out.resolve())).as_posix(),
    }
    for name in RERUN_OPTIONS:
        value = getattr(options, name)
        if value not in (None, False):
            record[name] = value if isinstance(value, bool) else str(value).removeprefix("torch.")
    header = (
        f"# What `moekit verify` needs, besides {MARKER_NAME}, to merge it again: paths_relative_to is the "
        "folder its relative paths are relative to, from this folder.\n"
    )
    (dst / RERUN_NAME).write_text(header + yaml.safe_dump(record, sort_keys=False))


def _named_refs(line: str, names: dict[str, str]) -> str:
    for ref, name in names.items():
        line = line.replace(f"`{ref}`", f"`{name}`")
    return line
