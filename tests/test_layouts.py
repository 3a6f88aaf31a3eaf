"""Layout inference from transformers' modeling code, the table it backs, and the shapes config.json implies.

- Every table family's facts equal what inference reads from transformers (so the table is right, and is only a
  shortcut).
- Inferred facts for fused-projection and renamed families: GPT-2's Conv1D c_attn, Falcon/GPT-NeoX
  query_key_value, Phi-3 qkv_proj/gate_up_proj, GPT-NeoX's `embed_out` head, Phi's head bias.
- `merge --dry-run` on a table family does not import transformers; the inferred layout is cached.
- Issue 15 item 8: an untied config without its head, or a config whose sizes disagree with the tensors, is refused
  in one line before anything is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from family_models import make_family_model, tiny_config
from helpers import assert_one_line_error, run_cli, write_config
from safetensors.torch import load_file, save_file

import moekit
from moekit.architectures import FAMILIES, Family, family_for_config
from moekit.errors import UserError
from moekit.layout_inference import cache_dir, infer_family


def _config_dict(model_type: str, **kw) -> dict:
    return tiny_config(model_type, **kw).to_dict()


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_table_agrees_with_inference(fam: Family):
    inferred = infer_family(_config_dict(fam.model_types[0]), "test", use_cache=False)
    assert inferred.hf_class == fam.hf_class
    assert inferred.layer_prefix == fam.layer_prefix
    assert inferred.num_layers_key == fam.num_layers_key
    assert inferred.input_embedding == fam.input_embedding
    assert inferred.output_embedding == fam.output_embedding
    assert set(inferred.embeddings) == set(fam.embeddings)
    assert set(inferred.pre_layer) == set(fam.pre_layer)
    assert inferred.mlp == fam.mlp
    assert inferred.is_moe == fam.is_moe
    assert fam.fact_origin("layers") == "table" and inferred.fact_origin("layers").startswith("inferred")


@pytest.mark.parametrize(
    "model_type, prefix, embeddings, mlp, fused",
    [
        ("gpt2", "transformer.h.", ("transformer.wte.weight", "lm_head.weight"),
         {"up": "mlp.c_fc.weight", "down": "mlp.c_proj.weight"}, {"qkv": "attn.c_attn.weight"}),
        ("falcon", "transformer.h.", ("transformer.word_embeddings.weight", "lm_head.weight"),
         {"up": "mlp.dense_h_to_4h.weight", "down": "mlp.dense_4h_to_h.weight"},
         {"qkv": "self_attention.query_key_value.weight"}),
        ("gpt_neox", "gpt_neox.layers.", ("gpt_neox.embed_in.weight", "embed_out.weight"),
         {"up": "mlp.dense_h_to_4h.weight", "down": "mlp.dense_4h_to_h.weight"},
         {"qkv": "attention.query_key_value.weight"}),
        ("phi3", "model.layers.", ("model.embed_tokens.weight", "lm_head.weight"),
         {"gate_up": "mlp.gate_up_proj.weight", "down": "mlp.down_proj.weight"},
         {"qkv": "self_attn.qkv_proj.weight", "gate_up": "mlp.gate_up_proj.weight"}),
        ("phi", "model.layers.", ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"),
         {"up": "mlp.fc1.weight", "down": "mlp.fc2.weight"}, {}),
        ("mpt", "transformer.blocks.", ("transformer.wte.weight", "lm_head.weight"),
         {"up": "ffn.up_proj.weight", "down": "ffn.down_proj.weight"}, {"qkv": "attn.Wqkv.weight"}),
    ],
)  # fmt: skip
def test_inferred_facts(model_type, prefix, embeddings, mlp, fused):
    fam = infer_family(_config_dict(model_type), "test", use_cache=False)
    assert fam.layer_prefix == prefix
    assert fam.embeddings == embeddings
    assert fam.mlp == mlp
    assert fam.fused == fused
    assert fam.input_embedding in fam.pre_layer
    assert {fam.layer_of(n)[0] for n in fam.expected_shapes if fam.layer_of(n)} == {0, 1, 2}


def test_inferred_shapes_match_saved_checkpoint(tmp_path):
    for model_type in ("gpt_neox", "falcon", "mpt", "qwen2_moe", "mixtral"):
        d = make_family_model(tmp_path / model_type, model_type, tokenizer=False)
        saved = {k: tuple(v.shape) for k, v in load_file(str(d / "model.safetensors")).items()}
        fam = infer_family(json.loads((d / "config.json").read_text()), "test", use_cache=False)
        assert fam.expected_shapes == saved, model_type


def test_layout_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    cfg = _config_dict("stablelm")
    first = family_for_config(cfg, "test")
    entries = list(cache_dir().glob("*.json"))
    assert len(entries) == 1
    again = family_for_config(cfg, "test")
    assert again == first and again.expected_shapes == first.expected_shapes
    other = family_for_config({**cfg, "intermediate_size": 96}, "test")  # another config, another entry
    assert len(list(cache_dir().glob("*.json"))) == 2
    assert other.expected_shapes[other.layer_tensor(0, other.mlp["down"])] == (64, 96)


def test_dry_run_of_table_family_does_not_import_transformers(tiny_llama, tmp_path):
    cfg = write_config(
        tmp_path / "m.yaml",
        {"merge_method": "linear", "models": [{"model": str(tiny_llama["ft1"]), "parameters": {"weight": 1.0}},
                                              {"model": str(tiny_llama["ft2"]), "parameters": {"weight": 1.0}}]},
    )  # fmt: skip
    code = (
        "import sys, moekit\n"
        f"moekit.merge({str(cfg)!r}, {str(tmp_path / 'out')!r}, dry_run=True, print_fn=lambda *a: None)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_model_type_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"model_type": "my_custom_lm", "auto_map": {"AutoModel": "x.Y"}})
    )
    save_file({"w": __import__("torch").zeros(2)}, str(d / "model.safetensors"))
    cfg = write_config(tmp_path / "m.yaml", {"merge_method": "passthrough", "models": [{"model": str(d)}]})
    proc = run_cli("merge", str(cfg), "-o", str(tmp_path / "out"), "--dry-run")
    assert_one_line_error(proc, "my_custom_lm", "remote code")


def test_composite_model_refused(tmp_path):
    """A LLaVA checkpoint (layers in text_config and vision_config) is refused in one line, not an AttributeError."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    d = tmp_path / "vlm"
    d.mkdir()
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    cfg = LlavaConfig(text_config=text, vision_config=vision).to_dict()
    cfg["architectures"] = ["LlavaForConditionalGeneration"]
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({"w": __import__("torch").randn(2)}, str(d / "model.safetensors"))
    config = write_config(tmp_path / "m.yaml", {"merge_method": "passthrough", "models": [{"model": str(d)}]})
    proc = run_cli("merge", str(config), "-o", str(tmp_path / "out"), "--dry-run")
    assert_one_line_error(proc, "composite", "text_config", "vision_config")


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _drop_tensor(d: Path, name: str) -> None:
    tensors = load_file(str(d / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "model_type, break_it, needles",
    [
        ("llama", lambda d: _drop_tensor(d, "lm_head.weight"), ("lm_head.weight", "tie_word_embeddings")),
        (
            "llama",
            lambda d: _edit_config(d, intermediate_size=96),
            ("mlp.gate_proj.weight", "intermediate_size"),
        ),
        ("llama", lambda d: _edit_config(d, num_key_value_heads=4), ("k_proj", "num_key_value_heads")),
        ("gpt_neox", lambda d: _drop_tensor(d, "embed_out.weight"), ("embed_out.weight",)),
        (
            "gpt_neox",
            lambda d: _edit_config(d, intermediate_size=96),
            ("gpt_neox.layers.0.mlp.", "GPTNeoXForCausalLM"),
        ),
        ("gpt2", lambda d: _edit_config(d, n_inner=96), ("c_fc", "GPT2LMHeadModel")),
        ("phi3", lambda d: _drop_tensor(d, "model.layers.1.mlp.gate_up_proj.weight"), ("gate_up_proj",)),
    ],
)
def test_config_implied_shapes_refused(tmp_path, model_type, break_it, needles):
    d = make_family_model(tmp_path / "m", model_type, tokenizer=False)
    break_it(d)
    cfg = write_config(tmp_path / "m.yaml", {"merge_method": "passthrough", "models": [{"model": str(d)}]})
    proc = run_cli(
        "merge", str(cfg), "-o", str(tmp_path / "out"), "--dry-run", env={"MOEKIT_CACHE": str(tmp_path)}
    )
    line = assert_one_line_error(proc, *needles)
    with pytest.raises(UserError) as err:  # the real run refuses it the same way, before writing
        moekit.merge(str(cfg), tmp_path / "out")
    assert str(err.value) in line
    assert not (tmp_path / "out").exists()
