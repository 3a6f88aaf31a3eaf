"""Each extension point of CONTRIBUTING.md is one file: here a throwaway merge method, dense family, MoE output
family and router are each added the way that file adds them (a registered function, a table row, a Router
subclass) and then used end to end, checked against an independent formula. Each is removed afterwards.

Tolerances: merges and copies are exact (fp32 in, fp32 out, bit-equal); the MoE output's logits are within 1e-5
of the dense model's (identical experts, as tests/test_moe_pairs.py); the router layer within 1e-6 (relative).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import load_tensors
from family_models import make_family_model

import moekit
from moekit import architectures
from moekit.architectures import Family, family_for_config
from moekit.merging.registry import METHODS, get_method, merge_method
from moekit.moe import layouts
from moekit.runtime import ROUTERS, MoELayer, Router, Routing, moe_forward, route


def test_a_merge_method_is_one_registered_function(tiny_llama, tmp_path):
    """A method registered as methods/*.py register theirs is planned, validated and run by `moekit.merge`."""

    def larger_magnitude(tensors, base):
        """Per element, the value of the model that moved it further from zero (ties: the first)."""
        first, second = tensors
        return torch.where(first.abs() >= second.abs(), first, second)

    merge_method("test_larger_magnitude", min_models=2, max_models=2, elementwise=True)(larger_magnitude)
    try:
        assert get_method("test_larger_magnitude").fn is larger_magnitude
        cfg = {
            "merge_method": "test_larger_magnitude",
            "models": [{"model": str(tiny_llama["ft1"])}, {"model": str(tiny_llama["ft2"])}],
            "dtype": "float32",
        }
        out = moekit.merge(cfg, tmp_path / "out")
    finally:
        del METHODS["test_larger_magnitude"]
    a, b, merged = (load_tensors(p) for p in (tiny_llama["ft1"], tiny_llama["ft2"], out))
    assert merged.keys() == a.keys()
    for name, x in a.items():
        y, want = b[name], x.clone()
        further = y.abs() > x.abs()
        want[further] = y[further]
        assert torch.equal(merged[name], want), name


@pytest.mark.slow
def test_a_dense_family_is_one_table_row(monkeypatch, tmp_path):
    """Granite, inferred from transformers today, given a FAMILIES row: the merge takes the row's layer facts."""
    row = Family(
        "granite",
        ("granite",),
        "GraniteForCausalLM",
        mlp={"gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"},
    )
    monkeypatch.setattr(architectures, "FAMILIES", (*architectures.FAMILIES, row))
    a = make_family_model(tmp_path / "a", "granite", seed=1, tokenizer=False)
    b = make_family_model(tmp_path / "b", "granite", seed=2, tokenizer=False)
    assert family_for_config(json.loads((a / "config.json").read_text()), "a") is row
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(b), "layer_range": [1, 3]}]},
        ],
        "dtype": "float32",
    }
    out = moekit.merge(cfg, tmp_path / "out")
    ta, tb, merged = (load_tensors(p) for p in (a, b, out))
    # Output layers 0, 1 are A's 0, 1 and output layers 2, 3 are B's 1, 2.
    sources = {0: (ta, 0), 1: (ta, 1), 2: (tb, 1), 3: (tb, 2)}
    for name, tensor in merged.items():
        layer = row.layer_of(name)
        if layer is None:  # the row's pre_layer tensors come from the first slice, the others from the last
            assert torch.equal(tensor, (ta if name in row.pre_layer else tb)[name]), name
        else:
            src, i = sources[layer[0]]
            assert torch.equal(tensor, src[row.layer_tensor(i, layer[1])]), name
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


def _logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow
def test_an_moe_output_family_is_one_table_row(monkeypatch, tmp_path):
    """A LAYOUTS row (Mixtral's facts under a new name) is chosen by `architecture:` and builds a model that
    transformers loads and that computes the dense model's logits with identical experts."""
    mixtral = next(layout for layout in layouts.LAYOUTS if layout.name == "mixtral")
    row = dataclasses.replace(mixtral, name="test_moe", display="Test-MoE", sources=("llama",), aliases=())
    monkeypatch.setattr(layouts, "LAYOUTS", (*layouts.LAYOUTS, row))
    dense = make_family_model(tmp_path / "dense", "llama", seed=5)
    cfg = {
        "base_model": str(dense),
        "gate_mode": "random",
        "experts_per_token": 2,
        "architecture": "test_moe",
        "upcycle": {"num_experts": 4},
        "dtype": "float32",
    }
    out = moekit.merge(cfg, tmp_path / "moe")
    tensors = load_tensors(out)
    assert row.expert_tensor(0, 3, "down") in tensors and row.router(0) in tensors
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(_logits(out, ids), _logits(dense, ids), atol=1e-5, rtol=0)


def test_a_router_is_one_class():
    """A Router subclass registers itself by name and runs in MoELayer.build and route()."""

    class SigmoidTop1(Router):
        """The best expert by logit, weighted by its sigmoid."""

        name = "test_sigmoid_top1"

        @staticmethod
        def choose(logits: torch.Tensor, top_k: int) -> Routing:
            best, index = logits.float().max(dim=-1, keepdim=True)
            return Routing(torch.sigmoid(best), index)

    try:
        assert ROUTERS["test_sigmoid_top1"] is SigmoidTop1
        layer = MoELayer.build(8, 6, 4, 1, router="test_sigmoid_top1", backend="torch")
        x = torch.randn(7, 8, generator=torch.Generator().manual_seed(3))
        out = layer(x)
        logits = (x @ layer.router.weight.t()).detach()
        # The rule, one token at a time in Python floats.
        index = torch.tensor([[max(range(4), key=lambda e: float(row[e]))] for row in logits])
        weight = torch.tensor([[1 / (1 + math.exp(-float(row.max())))] for row in logits])
        want = moe_forward(
            x, index, weight, layer.experts.gate_up_proj, layer.experts.down_proj, backend="torch"
        )
        torch.testing.assert_close(out.hidden, want, atol=1e-6, rtol=1e-6)
        assert torch.equal(route(logits, 1, "test_sigmoid_top1").indices, index)
    finally:
        del ROUTERS["test_sigmoid_top1"]
