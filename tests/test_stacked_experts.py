"""MoE checkpoints as merge inputs: the experts of a layer are merged as transformers 5 stacks them, one tensor, as
mergekit 0.1.5 merges them, and written back per expert as the input stores them.

References: the stacked view is compared with what transformers itself loads from the checkpoint; slerp and TIES
with mergekit's formulas (slerp in float64, TIES in mergekit's operation order) over the whole stacked tensor; the
tensor order with the order mergekit's scheduler runs them in (observed with mergekit 0.1.5 on this Mixtral).
"""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from conftest import load_tensors
from family_models import make_family_model
from safetensors.torch import save_file
from test_mergekit_numbers import mergekit_task_arithmetic

import moekit
from moekit.config import parse_merge_config
from moekit.io.checkpoint import Checkpoint
from moekit.merging.plan import build_plan
from moekit.merging.registry import method_for
from moekit.merging.stacked_experts import LAYOUTS, StackedExperts
from moekit.options import MergeOptions

FP32_TOL = 1e-6  # fp32 arithmetic against the float64 / same-order formulas


def finetune(base, out, seed, scale=0.02):
    """`base` plus fresh Gaussian noise on every tensor, stored as `base` stores it (per-expert names). Expert e
    moves (1 + e) times as far, so the experts' angles to the base differ."""
    out.mkdir(parents=True)
    shutil.copy(base / "config.json", out / "config.json")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, v in load_tensors(base).items():
        e = re.search(r"\.experts\.(\d+)\.", k)
        tensors[k] = v + scale * (1 + int(e.group(1)) if e else 1) * torch.randn(v.shape, generator=g)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtral")
    base = make_family_model(root / "base", "mixtral", seed=int(torch.randint(0, 2**31, ())), tokenizer=False)
    seeds = torch.randint(0, 2**31, (2,)).tolist()
    return {
        "base": base,
        "ft1": finetune(base, root / "ft1", seeds[0]),
        "ft2": finetune(base, root / "ft2", seeds[1]),
    }


def stacked(tensors: dict, layer: int, model_type: str = "mixtral") -> dict[str, torch.Tensor]:
    """A layer's stacked expert tensors rebuilt from the per-expert ones (transformers' conversion, by hand)."""
    out = {}
    for s in LAYOUTS[model_type].stacks:
        experts, e = [], 0
        while f"model.layers.{layer}.{s.parts[0].format(e=e)}" in tensors:
            experts.append(torch.cat([tensors[f"model.layers.{layer}.{p.format(e=e)}"] for p in s.parts]))
            e += 1
        out[s.stacked] = torch.stack(experts)
    return out


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_stacked_view_is_what_transformers_loads(tmp_path, model_type):
    """Names and values of the stacked view equal the loaded model's state_dict (transformers 5 converts the
    per-expert files on load): exactly, every tensor."""
    from transformers import AutoModelForCausalLM

    path = make_family_model(
        tmp_path / model_type, model_type, seed=int(torch.randint(0, 2**31, ())), tokenizer=False
    )
    on_disk = Checkpoint.open(str(path))
    assert any(".experts.0." in n for n in on_disk.tensors.names())  # stored per expert
    view = StackedExperts(on_disk.tensors, on_disk.family, LAYOUTS[model_type], str(path))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()
        if json.loads((path / "config.json").read_text()).get("tie_word_embeddings"):
            loaded.pop("lm_head.weight")
        assert set(view.names()) == set(loaded)
        for name in view.names():
            got = view.read(name)
            assert got.shape == view.infos[name].shape and torch.equal(got, loaded[name]), name
    finally:
        view.close()


def mergekit_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp in float64: the angle between the whole tensors (norms over every element)."""
    a, b = v0.double(), v1.double()
    na, nb = a / a.norm(), b / b.norm()
    dot = float((na * nb).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def test_slerp_and_ties_merge_each_layers_experts_as_one_tensor(mixtral, tmp_path):
    """slerp's angle and TIES's top-k are taken over a layer's whole stack [E, 2I, H] (and [E, H, I]), not per
    expert; the output keeps the inputs' per-expert names, and transformers loads it to the same stacks."""
    base, ft1, ft2 = (load_tensors(mixtral[k]) for k in ("base", "ft1", "ft2"))
    t = float(torch.rand(()) * 0.6 + 0.2)
    slerp_out = moekit.merge(
        {
            "merge_method": "slerp",
            "base_model": str(mixtral["base"]),
            "models": [{"model": str(mixtral["base"])}, {"model": str(mixtral["ft1"])}],
            "parameters": {"t": t},
        },
        tmp_path / "slerp",
    )
    weight, density = [0.6, 0.4], [0.5, 0.7]
    ties_out = moekit.merge(
        {
            "merge_method": "ties",
            "base_model": str(mixtral["base"]),
            "models": [
                {"model": str(mixtral[k]), "parameters": {"weight": w, "density": d}}
                for k, w, d in zip(("ft1", "ft2"), weight, density)
            ],
        },
        tmp_path / "ties",
    )
    got_slerp, got_ties = load_tensors(slerp_out), load_tensors(ties_out)
    assert set(got_slerp) == set(base) == set(got_ties)  # written per expert, as stored
    for layer in range(3):
        b, f1, f2 = (stacked(x, layer) for x in (base, ft1, ft2))
        gs, gt = stacked(got_slerp, layer), stacked(got_ties, layer)
        for name in b:
            want = mergekit_slerp(t, b[name], f1[name])
            assert (gs[name].double() - want).abs().max() <= FP32_TOL, name
            per_expert = torch.stack([mergekit_slerp(t, x, y) for x, y in zip(b[name], f1[name])])
            assert (per_expert - want).abs().max() > 100 * FP32_TOL  # the grouping matters here
            keep = []
            for f, d in zip((f1[name], f2[name]), density):
                w = (f - b[name]).abs().reshape(-1)
                mask = torch.zeros(w.numel())
                mask[torch.topk(w, int(d * w.numel())).indices] = 1
                keep.append(mask.view(b[name].shape))
            want = mergekit_task_arithmetic(
                b[name], [f1[name], f2[name]], weight, 1.0, True, keep, consensus=True
            )
            assert (gt[name] - want).abs().max() <= FP32_TOL, name

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ties_out), dtype=torch.float32)
    loaded = model.model.layers[1].mlp.experts.gate_up_proj.detach()
    assert torch.equal(loaded, stacked(got_ties, 1)["mlp.experts.gate_up_proj"])


def test_random_methods_draw_in_mergekits_tensor_order(mixtral):
    """mergekit 0.1.5 schedules the tensors it converts (the stacks, the renamed router) first, then the rest by
    name: the plan runs in that order, so DARE's draws land where mergekit's do."""
    cfg = parse_merge_config(
        {
            "merge_method": "dare_ties",
            "base_model": str(mixtral["base"]),
            "models": [{"model": str(mixtral["ft1"]), "parameters": {"weight": 0.5, "density": 0.5}}],
        },
        None,
    )
    plan = build_plan(cfg, MergeOptions(), method_for(cfg))
    try:
        order = [j.out.name for j in plan.jobs]
    finally:
        plan.close()
    converted = [
        f"model.layers.{i}.mlp.{r}"
        for i in range(3)
        for r in ("experts.gate_up_proj", "experts.down_proj", "gate.weight")
    ]
    assert order[: len(converted)] == converted
    assert order[len(converted) :] == sorted(order[len(converted) :])
    assert "lm_head.weight" in order and not any(".experts.0." in n for n in order)


def test_elementwise_methods_keep_per_expert_streaming(mixtral, tmp_path):
    """linear gives the same numbers per expert or stacked, so its plan keeps the stored tensors (row-chunked);
    the result is the weighted mean, element by element (float64 reference, tolerance 1e-6)."""
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(mixtral["base"]), "parameters": {"weight": 0.3}},
            {"model": str(mixtral["ft1"]), "parameters": {"weight": 0.7}},
        ],
    }
    parsed = parse_merge_config(cfg, None)
    plan = build_plan(parsed, MergeOptions(), method_for(parsed))
    try:
        assert any(".experts.0.w1." in j.out.name for j in plan.jobs)
    finally:
        plan.close()
    got = load_tensors(moekit.merge(cfg, tmp_path / "linear"))
    base, ft1 = load_tensors(mixtral["base"]), load_tensors(mixtral["ft1"])
    for k in base:
        assert (got[k].double() - (0.3 * base[k].double() + 0.7 * ft1[k].double())).abs().max() <= FP32_TOL, k


def test_stacked_checkpoint_merges_with_a_per_expert_one(mixtral, tmp_path):
    """A checkpoint stored stacked (as mergekit writes it) merges with per-expert ones: same numbers as when both
    are per expert, and the output takes the reference's layout."""
    stacked_dir = tmp_path / "stacked"
    stacked_dir.mkdir()
    shutil.copy(mixtral["ft1"] / "config.json", stacked_dir / "config.json")
    ft1 = Checkpoint.open(str(mixtral["ft1"]))
    view = StackedExperts(ft1.tensors, ft1.family, LAYOUTS["mixtral"], "ft1")
    save_file(
        {n: view.read(n) for n in view.names()}, str(stacked_dir / "model.safetensors"), {"format": "pt"}
    )
    view.close()
    cfg = lambda a, b: {  # noqa: E731
        "merge_method": "slerp",
        "base_model": str(a),
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"t": 0.4},
    }
    want = load_tensors(moekit.merge(cfg(mixtral["base"], mixtral["ft1"]), tmp_path / "both"))
    mixed = load_tensors(moekit.merge(cfg(mixtral["base"], stacked_dir), tmp_path / "mixed"))
    assert set(mixed) == set(want) and all(torch.equal(mixed[k], want[k]) for k in want)
    as_stacked = load_tensors(moekit.merge(cfg(stacked_dir, mixtral["base"]), tmp_path / "stacked-ref"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in as_stacked
