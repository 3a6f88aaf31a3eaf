"""`model+lora` references: the adapted weights equal PEFT's merge_and_unload() (the reference implementation),
in a dense merge and as MoE expert / base sources, and bad adapters fail in one line.

Tolerance: 1e-6 absolute in float32 (the update is the same few products in the same order; differences come
only from a matmul over a row range instead of the whole matrix). bfloat16 must match bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_tensors
from helpers import assert_one_line_error, run_cli, write_config
from lora_helpers import max_diff, peft_adapter

import moekit
from moekit.errors import UserError

TOL = 1e-6

CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora_patterns": dict(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "o_proj", "gate_proj"],
        rank_pattern={"o_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 3},
    ),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "up_proj"]),
    "embedding_and_modules_to_save": dict(
        r=4, lora_alpha=16, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]
    ),
}


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    made = {}
    for i, (name, kwargs) in enumerate(CASES.items()):
        made[name] = (root / name, peft_adapter(tiny_llama["base"], root / name, seed=10 + i, **kwargs))
    return made


@pytest.mark.parametrize("case", list(CASES))
def test_base_plus_lora_equals_peft_merge_and_unload(tiny_llama, adapters, tmp_path, case):
    adapter, want = adapters[case]
    cfg = {"merge_method": "passthrough", "models": [{"model": f"{tiny_llama['base']}+{adapter}"}]}
    got = load_tensors(moekit.merge(cfg, tmp_path / "out"))
    assert set(got) == set(want)
    base = load_tensors(tiny_llama["base"])
    assert any(not torch.equal(got[k], base[k]) for k in got), "the adapter changed nothing"
    assert max_diff(got, want) <= TOL


def test_lora_in_a_weighted_dense_merge(tiny_llama, adapters, tmp_path):
    adapter, adapted = adapters["plain"]
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": f"{tiny_llama['base']}+{adapter}", "parameters": {"weight": 0.3}},
            {"model": str(tiny_llama["ft1"]), "parameters": {"weight": 0.7}},
        ],
    }
    got = load_tensors(moekit.merge(cfg, tmp_path / "out"))
    ft1 = load_tensors(tiny_llama["ft1"])
    want = {k: 0.3 * adapted[k] + 0.7 * ft1[k] for k in ft1}
    assert max_diff(got, want) <= TOL


def test_bfloat16_base_matches_peft_bit_for_bit(tmp_path):
    from moekit.demo.tiny_models import make_base

    base = make_base(tmp_path / "base", seed=3, dtype=torch.bfloat16, tokenizer=False, num_layers=2)
    want = peft_adapter(
        base,
        tmp_path / "lora",
        seed=4,
        dtype=torch.bfloat16,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "up_proj"],
    )
    cfg = {"merge_method": "passthrough", "models": [{"model": f"{base}+{tmp_path / 'lora'}"}]}
    got = load_tensors(moekit.merge(cfg, tmp_path / "out"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_lora_as_moe_expert_and_base_source(tiny_llama, adapters, tmp_path):
    """Experts from base+loraA and base+loraB, base_model itself base+lora: each tensor is the PEFT-merged one."""
    base = tiny_llama["base"]
    (plain, plain_merged), (dora, dora_merged) = adapters["plain"], adapters["dora"]
    (patt, patt_merged) = adapters["rslora_patterns"]
    cfg = {
        "base_model": f"{base}+{patt}",
        "gate_mode": "random",
        "experts_per_token": 2,
        "experts": [{"source_model": f"{base}+{plain}"}, {"source_model": f"{base}+{dora}"}],
    }
    got = load_tensors(moekit.merge(cfg, tmp_path / "moe", seed=1))
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["architectures"] == [
        "MixtralForCausalLM"
    ]
    pairs = []
    for layer in range(4):
        moe = f"model.layers.{layer}.block_sparse_moe.experts"
        for e, merged in enumerate((plain_merged, dora_merged)):
            for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                pairs.append(
                    (got[f"{moe}.{e}.{w}.weight"], merged[f"model.layers.{layer}.mlp.{proj}.weight"])
                )
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            pairs.append((got[name], patt_merged[name]))
    assert max((a - b).abs().max().item() for a, b in pairs) <= TOL
    # the adapters do change these tensors, so the comparison above is not of base against base
    base_tensors = load_tensors(base)
    assert not torch.equal(
        got["model.layers.0.block_sparse_moe.experts.1.w3.weight"],
        base_tensors["model.layers.0.mlp.up_proj.weight"],
    )


def test_hidden_gates_refuse_an_adapted_base(tiny_llama, adapters, tmp_path):
    base, (plain, _) = tiny_llama["base"], adapters["plain"]
    cfg = {
        "base_model": f"{base}+{plain}",
        "gate_mode": "hidden",
        "experts": [{"source_model": str(base), "positive_prompts": [p]} for p in ("a b c", "d e f")],
    }
    with pytest.raises(UserError, match="MODEL\\+LORA"):
        moekit.merge(cfg, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()


def _broken_adapter(src, dst, config_update=None, drop=None):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config_update:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config_update)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if drop:
        tensors = load_file(str(dst / "adapter_model.safetensors"))
        save_file({k: v for k, v in tensors.items() if drop not in k}, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize(
    "change, needles",
    [
        ({"config_update": {"use_qalora": True}}, ["use_qalora", "does not implement"]),
        ({"config_update": {"peft_type": "IA3"}}, ["IA3", "LoRA adapters only"]),
        ({"config_update": {"init_lora_weights": "pissa"}}, ["pissa", "changes the base weights"]),
        ({"config_update": {"r": 8}}, ["r=8", "lora_A has 4 rows"]),
        ({"drop": "layers.2.self_attn.q_proj.lora_A"}, ["layers.2.self_attn.q_proj", "partner"]),
    ],
)
def test_bad_adapters_fail_in_one_line(tiny_llama, adapters, tmp_path, change, needles):
    bad = _broken_adapter(adapters["plain"][0], tmp_path / "bad", **change)
    cfg = {"merge_method": "passthrough", "models": [{"model": f"{tiny_llama['base']}+{bad}"}]}
    with pytest.raises(UserError) as e:
        moekit.merge(cfg, tmp_path / "out")
    assert all(n in str(e.value) for n in needles) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_bad_references_fail_in_one_line(tiny_llama, adapters, tmp_path):
    base = tiny_llama["base"]
    for ref, needles in (
        (f"{base}+{adapters['plain'][0]}+x", ["MODEL+ADAPTER"]),
        (f"{base}+{tiny_llama['ft1']}", ["not a LoRA adapter", "adapter_config.json"]),
    ):
        with pytest.raises(UserError) as e:
            moekit.merge({"merge_method": "passthrough", "models": [{"model": ref}]}, tmp_path / "out")
        assert all(n in str(e.value) for n in needles), str(e.value)
    # and through the command line: exit 2, one line, no traceback
    cfg = write_config(
        tmp_path / "c.yaml",
        {"merge_method": "passthrough", "models": [{"model": f"{base}+{tmp_path / 'nowhere'}"}]},
    )
    assert_one_line_error(
        run_cli("merge", str(cfg), "-o", str(tmp_path / "out")),
        "LoRA adapter",
        "nowhere",
        "adapter_config.json",
    )


def test_adapter_for_another_model_is_refused(tmp_path, adapters):
    from moekit.demo.tiny_models import make_base

    wider = make_base(tmp_path / "wider", seed=1, hidden_size=96, tokenizer=False)
    with pytest.raises(UserError, match="trained on another model"):
        moekit.merge(
            {"merge_method": "passthrough", "models": [{"model": f"{wider}+{adapters['plain'][0]}"}]},
            tmp_path / "out",
        )
