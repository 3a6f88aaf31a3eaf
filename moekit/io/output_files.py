"""Everything in an output directory besides the weights: config, generation config, tokenizer, model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from moekit._version import __version__

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

DTYPE_CONFIG_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def set_config_dtype(config: dict, dtype: torch.dtype) -> dict:
    """Record the weights' dtype under the key(s) the source used (`torch_dtype` in 4.x, `dtype` in 5.x)."""
    name = DTYPE_CONFIG_NAMES.get(dtype)
    if name is None:
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


def write_recipe(
    dst: Path, raw_config: dict, title: str, summary_lines: list[str], model_card: bool = True
) -> None:
    """moekit_config.yaml (the config, as given) and, unless `model_card` is off, a README.md model card."""
    text = yaml.safe_dump(raw_config, sort_keys=False)
    (dst / MARKER_NAME).write_text(text)
    if not model_card:
        return
    body = "\n".join(f"- {line}" for line in summary_lines)
    card = (
        "---\nlibrary_name: transformers\ntags:\n- moekit\n- merge\n---\n"
        f"# {title}\n\n"
        f"This model was made with [moekit](https://pypi.org/project/moekit/) {__version__}.\n\n"
        f"{body}\n\n"
        "## Configuration\n\nThe config that produced it (also saved as `moekit_config.yaml`):\n\n"
        f"```yaml\n{text}```\n"
    )
    (dst / "README.md").write_text(card)
