"""`moekit inspect MODEL`: facts and their origin for a table family, an inferred (fused, renamed-head) family and
an MoE checkpoint; a broken model is one line, exit 2."""

from __future__ import annotations

import json

from family_models import make_family_model
from helpers import assert_one_line_error, run_cli
from safetensors.torch import load_file, save_file

from moekit.model_info import describe_model


def _fact(lines: list[str], fact: str) -> str:
    return next(line for line in lines if line.strip().startswith(f"{fact}:"))


def test_inspect_table_family_agrees_with_inference(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    d = make_family_model(tmp_path / "llama", "llama", tie_word_embeddings=True)
    lines = describe_model(d)
    assert "family: llama (LlamaForCausalLM), dense" in lines
    assert "[table; agrees with transformers' modeling code]" in _fact(lines, "layers")
    assert "tied: yes" in _fact(lines, "tied")
    assert "3 layers under 'model.layers.N.'" in _fact(lines, "layers")
    n_params = sum(t.numel() for t in load_file(str(d / "model.safetensors")).values())
    assert any(line.startswith("size:") and f"{n_params:,} parameters" in line for line in lines)
    assert any(
        line == f"dtypes: float32 ({len(load_file(str(d / 'model.safetensors')))} tensors)" for line in lines
    )
    assert "BPE with" in next(line for line in lines if line.startswith("tokenizer:"))


def test_inspect_inferred_and_moe(tmp_path):
    neox = make_family_model(tmp_path / "neox", "gpt_neox")
    out = run_cli("inspect", str(neox), env={"MOEKIT_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "[inferred: GPTNeoXForCausalLM built on the meta device" in _fact(lines, "layers")
    assert "output 'embed_out.weight'" in _fact(lines, "embeddings")
    assert "qkv 'attention.query_key_value.weight'" in _fact(lines, "fused")
    assert "tied: no" in _fact(lines, "tied")

    moe = make_family_model(tmp_path / "qmoe", "qwen2_moe", tokenizer=False)
    lines = describe_model(moe, compare_with_inference=False)
    assert "4 experts, 2 per token, in 3 layers: 'mlp.experts.E' (4 experts); with a shared expert" in _fact(
        lines, "moe"
    )
    assert lines[-1].startswith("tokenizer: none")


def test_inspect_broken_model_is_one_line(tmp_path):
    d = make_family_model(tmp_path / "m", "llama", tokenizer=False)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((d / "config.json").read_text())["tie_word_embeddings"] is False
    assert_one_line_error(run_cli("inspect", str(d)), "lm_head.weight", "tie_word_embeddings")
    assert_one_line_error(run_cli("inspect", str(tmp_path / "nope")), "does not exist")
