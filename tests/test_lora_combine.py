"""Adapter merges: several LoRAs into one, against PEFT's own add_weighted_adapter on the same adapters.

The comparison is of each module's effective update s·B·A (PEFT's get_delta_weight) of PEFT's merged adapter and
of moekit's, loaded side by side into one PeftModel. Tolerance: 1e-6 relative to the update's largest entry
(the same float32 operations; the SVD variants go through LAPACK's reduced instead of full SVD). DARE's masks
are drawn from moekit's own seeded generator, so DARE is checked for its definition instead: every kept entry
is the PEFT linear-merge entry rescaled by 1/density, and about `density` of the entries are kept.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_tensors
from lora_helpers import peft_adapter

import moekit
from moekit.errors import UserError
from moekit.lora.combine import CombineOptions, merge_adapters

REL_TOL = 1e-6


@pytest.fixture(scope="module")
def loras(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    base = tiny_llama["base"]
    made = {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        "b": dict(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"]),
        "c": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj"]),
        "saves_head": dict(r=4, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    }
    for i, (name, kwargs) in enumerate(made.items()):
        peft_adapter(base, root / name, seed=20 + i, **kwargs)
    return {name: root / name for name in made}


def _peft_vs_ours(base, first, second, weights, ours, **kwargs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base)), str(first), adapter_name="x"
    )
    model.load_adapter(str(second), adapter_name="y")
    model.add_weighted_adapter(["x", "y"], weights, "merged", **kwargs)
    model.load_adapter(str(ours), adapter_name="ours")
    pairs = []
    for _, module in model.named_modules():
        names = {*getattr(module, "lora_A", {}), *getattr(module, "lora_embedding_A", {})}
        if "merged" in names:
            assert "ours" in names
            pairs.append((module.get_delta_weight("merged"), module.get_delta_weight("ours")))
    return pairs


@pytest.mark.parametrize(
    "kind, pair, density",
    [
        ("linear", "ab", None),
        ("ties", "ab", 0.5),
        ("magnitude_prune", "ab", 0.6),
        ("cat", "ac", None),
        ("svd", "ac", None),
        ("ties_svd", "ac", 0.5),
        ("magnitude_prune_svd", "ab", 0.4),
    ],
)
def test_matches_peft_add_weighted_adapter(tiny_llama, loras, tmp_path, kind, pair, density):
    weights = [0.7, -0.4]  # a negative weight exercises PEFT's sign-on-A convention
    first, second = loras[pair[0]], loras[pair[1]]
    out = merge_adapters(
        [(first, weights[0]), (second, weights[1])], tmp_path / "m", CombineOptions(kind, density=density)
    )
    pairs = _peft_vs_ours(
        tiny_llama["base"], first, second, weights, out, combination_type=kind, density=density
    )
    assert len(pairs) == 13  # q_proj x4 in both; v_proj x4 / embed_tokens or down_proj x4 in one
    for want, got in pairs:
        assert want.abs().max() > 0
        assert ((want - got).abs().max() / want.abs().max()).item() <= REL_TOL


def test_dare_keeps_rescaled_entries_and_is_seeded(tiny_llama, loras, tmp_path):
    weights = [(loras["a"], 0.7), (loras["b"], 0.5)]
    density = 0.5
    linear = load_tensors(merge_adapters(weights, tmp_path / "lin", CombineOptions("linear")))
    dare = load_tensors(
        merge_adapters(weights, tmp_path / "d1", CombineOptions("dare_linear", density=density))
    )
    again = load_tensors(
        merge_adapters(weights, tmp_path / "d2", CombineOptions("dare_linear", density=density))
    )
    other = merge_adapters(weights, tmp_path / "d3", CombineOptions("dare_linear", density=density, seed=1))
    assert all(torch.equal(dare[k], again[k]) for k in dare)
    assert any(not torch.equal(dare[k], v) for k, v in load_tensors(other).items())
    # with one adapter holding a module (v_proj: only "a"), each entry is either dropped or rescaled by 1/density
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    kept = dare[name] != 0
    assert torch.allclose(dare[name][kept], linear[name][kept] / density, rtol=1e-6, atol=0)
    assert 0.35 < kept.float().mean().item() < 0.65


def test_single_modules_to_save_is_carried_and_clashes_refused(tiny_llama, loras, tmp_path):
    out = merge_adapters(
        [(loras["a"], 1.0), (loras["saves_head"], 1.0)], tmp_path / "m", CombineOptions("cat")
    )
    merged, saved = load_tensors(out), load_tensors(loras["saves_head"])
    assert torch.equal(merged["base_model.model.lm_head.weight"], saved["base_model.model.lm_head.weight"])
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    with pytest.raises(UserError, match="lm_head"):
        merge_adapters([(loras["saves_head"], 1.0), (loras["saves_head"], 0.5)], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_refusals(loras, tmp_path):
    with pytest.raises(UserError, match="one rank.*use cat or svd"):
        merge_adapters(
            [(loras["a"], 1.0), (loras["c"], 1.0)], tmp_path / "x", CombineOptions("ties", density=0.5)
        )
    with pytest.raises(UserError, match="needs a density"):
        merge_adapters([(loras["a"], 1.0), (loras["b"], 1.0)], tmp_path / "x", CombineOptions("ties"))
    with pytest.raises(UserError, match="did you mean 'ties'"):
        merge_adapters([(loras["a"], 1.0), (loras["b"], 1.0)], tmp_path / "x", CombineOptions("tie"))


def test_config_form_through_moekit_merge_and_into_a_full_model(tiny_llama, loras, tmp_path):
    """`adapters:` in a merge config makes an adapter; that adapter applied with base+adapter equals PEFT's."""
    from lora_helpers import max_diff, merged_by_peft

    cfg = {
        "adapters": [
            {"adapter": str(loras["a"]), "weight": 0.6},
            {"adapter": str(loras["b"]), "weight": 0.4},
        ],
        "combination_type": "cat",
    }
    out = moekit.merge(cfg, tmp_path / "m")
    assert (out / "moekit_config.yaml").is_file() and (out / "adapter_config.json").is_file()
    card = (out / "README.md").read_text()
    assert f"`{loras['a'].name}` weight 0.6" in card and str(loras["a"].parent) not in card  # names, no paths
    base = tiny_llama["base"]
    full = moekit.merge(
        {"merge_method": "passthrough", "models": [{"model": f"{base}+{out}"}]}, tmp_path / "full"
    )
    assert max_diff(load_tensors(full), merged_by_peft(base, out)) <= 1e-6
    with pytest.raises(UserError, match="did you mean 'density'"):
        moekit.merge({**cfg, "densty": 0.5}, tmp_path / "y")
