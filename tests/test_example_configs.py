"""Every example in merge_configs/ runs as shipped, with its model paths pointed at the tiny test models.

The examples are documentation users copy; this keeps them true. Model references are rewritten in order of first
appearance (base_model -> the base, other models -> the fine-tunes); every other key is used unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_tensors

import moekit

EXAMPLES = sorted(
    p
    for p in (Path(__file__).parent.parent / "merge_configs").glob("*.yaml")
    if not p.name.startswith("demo_")
)


@pytest.fixture(scope="module")
def tiny_loras(tiny_llama, tmp_path_factory) -> list[Path]:
    """Rank-4 LoRA adapters of the tiny base, extracted from its three fine-tunes."""
    from moekit.lora.extract import ExtractOptions, extract_lora

    root = tmp_path_factory.mktemp("example_loras")
    only_lora = ExtractOptions(max_rank=4, exclude=("embed_tokens", "lm_head"), skip_undecomposable=True)
    return [
        extract_lora(str(tiny_llama["base"]), str(tiny_llama[ft]), root / ft, only_lora).out
        for ft in ("ft1", "ft2", "ft3")
    ]


def _point_at(config: dict, models: dict[str, Path], loras: list[Path] = ()) -> dict:
    """Replace every model reference by a tiny model: base_model -> base, the others -> ft1, ft2, ft3 in order;
    the adapters of MODEL+ADAPTER references and of `adapters:` lists -> the tiny LoRAs in order."""
    mapping: dict[str, str] = {}
    spares = iter(["ft1", "ft2", "ft3", "ft1", "ft2", "ft3"])
    adapters = iter(list(loras) * 2)

    def sub(ref: str) -> str:
        if ref not in mapping:
            if "+" in ref:
                model, _ = ref.split("+")
                mapping[ref] = f"{sub(model)}+{next(adapters)}"
            else:
                mapping[ref] = str(
                    models["base"] if ref == config.get("base_model") else models[next(spares)]
                )
        return mapping[ref]

    for entry in config.get("adapters") or []:
        entry["adapter"] = str(next(adapters))

    if config.get("base_model"):
        sub(config["base_model"])
        config["base_model"] = sub(config["base_model"])
    for entry in config.get("models") or []:
        entry["model"] = sub(entry["model"])
    for sl in config.get("slices") or []:
        for src in sl["sources"]:
            src["model"] = sub(src["model"])
        if sl.get("base_model"):
            sl["base_model"] = sub(sl["base_model"])
    for key in ("experts", "shared_experts"):
        for entry in config.get(key) or []:
            entry["source_model"] = sub(entry["source_model"])
    config.pop("out", None)
    return config


def test_every_method_has_an_example():
    from moekit.merging.registry import METHODS, get_method

    get_method("linear")  # imports every method module
    shown = {yaml.safe_load(p.read_text()).get("merge_method") for p in EXAMPLES}
    missing = sorted(set(METHODS) - shown)
    assert not missing, f"methods without an example in merge_configs/: {missing}"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(example, tiny_llama, tiny_loras, tmp_path):
    config = _point_at(yaml.safe_load(example.read_text()), tiny_llama, tiny_loras)
    out = moekit.merge(config, tmp_path / "out", seed=1)
    tensors = load_tensors(out)
    assert tensors, example.name
    assert all(torch.isfinite(t.float()).all() for t in tensors.values()), example.name
    made = "adapter_config.json" if "adapters" in config else "config.json"
    assert (out / made).is_file() and (out / "moekit_config.yaml").is_file()
