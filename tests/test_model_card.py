"""The model card is ready for the hub: YAML front matter with the metadata the hub reads, and no local paths."""

from __future__ import annotations

import json
import shutil

import yaml

import moekit


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    header, _ = card[4:].split("\n---\n", 1)
    return yaml.safe_load(header)


def test_dense_card_names_inputs_and_hides_local_paths(tiny_llama, tmp_path):
    # ft2 records a hub id in config.json: the card uses it; the others are named by their directory.
    ft2 = shutil.copytree(tiny_llama["ft2"], tmp_path / "models" / "local-ft2")
    config = json.loads((ft2 / "config.json").read_text())
    config["_name_or_path"] = "someorg/tiny-ft2"
    (ft2 / "config.json").write_text(json.dumps(config))
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_llama["base"]),
        "models": [
            {"model": str(tiny_llama["ft1"]), "parameters": {"weight": 0.7}},
            {"model": str(ft2), "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",
    }
    out = moekit.merge(cfg, tmp_path / "out")
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert sorted(meta["base_model"]) == ["base", "ft1", "someorg/tiny-ft2"]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["merge", "moekit"]
    for root in (tmp_path, tiny_llama["base"].parent):
        assert str(root) not in card
    assert "pypi.org" not in card
    # huggingface_hub (a transformers dependency) reads the same metadata; its online validate() is not run
    from huggingface_hub import ModelCard

    data = ModelCard(card).data
    assert data.base_model == meta["base_model"] and data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation" and data.tags == ["merge", "moekit"]
    # the recipe keeps the paths that reproduce the merge
    assert yaml.safe_load((out / "moekit_config.yaml").read_text()) == cfg


def test_moe_card_is_tagged_moe(tiny_llama, tmp_path):
    base = str(tiny_llama["base"])
    cfg = {
        "base_model": base,
        "gate_mode": "random",
        "experts_per_token": 1,
        "experts": [{"source_model": base}, {"source_model": str(tiny_llama["ft1"])}],
    }
    out = moekit.merge(cfg, tmp_path / "moe", seed=0)
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == ["base", "ft1"]
    assert meta["tags"] == ["merge", "moekit", "moe"]
    assert str(tiny_llama["base"].parent) not in card
