"""MergeOptions, the one way a run's switches reach the planner and the executor, and the import structure of the
plan -> execute -> output layer (config knows nothing of the registry; the MoE builder not the dense API)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import load_tensors
from hostile_models import linear_config

import moekit
from moekit.errors import UserError
from moekit.options import MergeOptions


def test_options_object_and_keywords_give_the_same_merge(tiny_llama, tmp_path):
    """A DARE merge (random: the seed must arrive) through an options object, through keywords, and through an
    object with a keyword on top: the same bytes; another seed gives other bytes."""
    config = {
        "merge_method": "dare_linear",
        "base_model": str(tiny_llama["base"]),
        "models": [
            {"model": str(tiny_llama[f"ft{i}"]), "parameters": {"weight": 0.5, "density": 0.5}}
            for i in (1, 2)
        ],
    }
    by_object = load_tensors(moekit.merge(config, tmp_path / "a", MergeOptions(seed=3, shard_size=4096)))
    by_keywords = load_tensors(moekit.merge(config, tmp_path / "b", seed=3, shard_size=4096))
    on_top = load_tensors(moekit.merge(config, tmp_path / "c", MergeOptions(seed=9), seed=3))
    other_seed = load_tensors(moekit.merge(config, tmp_path / "d", seed=4))
    assert len(list((tmp_path / "a").glob("*.safetensors"))) > 1  # the shard size arrived too
    for name, t in by_object.items():
        assert torch.equal(t, by_keywords[name]) and torch.equal(t, on_top[name]), name
    assert any(not torch.equal(t, other_seed[n]) for n, t in by_object.items() if "layers" in n)


def test_a_misspelled_option_is_refused_by_name(tiny_llama, tmp_path):
    with pytest.raises(TypeError, match="allow_nonfinit"):
        moekit.merge(linear_config(tiny_llama["ft1"]), tmp_path / "out", allow_nonfinit=True)
    with pytest.raises(UserError, match="--shard-size must be a positive number of bytes, got 0"):
        MergeOptions(shard_size=0)
    assert not (tmp_path / "out").exists()


def test_dense_only_switches_are_refused_for_an_moe_build(tiny_llama, tmp_path):
    config = {"base_model": str(tiny_llama["base"]), "gate_mode": "random", "experts_per_token": 1}
    config["experts"] = [{"source_model": str(tiny_llama["ft1"])}, {"source_model": str(tiny_llama["ft2"])}]
    with pytest.raises(UserError, match="apply to dense merges, not MoE builds"):
        moekit.merge(config, tmp_path / "out", copy_tokenizer=False)


@pytest.mark.parametrize(
    ("module", "must_not_load"),
    [("moekit.config", "moekit.merging.registry"), ("moekit.moe.api", "moekit.merging.api")],
)
def test_no_import_cycle(module, must_not_load):
    """Importing one side loads nothing of the other (a lazy import would hide a cycle; there is none to hide)."""
    code = f"import sys, {module}; print({must_not_load!r} in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
