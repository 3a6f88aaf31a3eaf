"""`moekit extract-lora`: at full rank the adapter reproduces the fine-tune; at rank r its error is the
Eckart-Young optimum (computed here independently, in float64 with numpy); PEFT loads and runs the adapter; the
mergekit options do what they say.

Tolerances: full-rank reproduction 1e-5 absolute (float32 SVD of deltas of size ~0.05). The rank-r error equals
the optimum to 1e-5 relative (float32 factors against a float64 SVD).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_tensors
from helpers import assert_one_line_error, run_cli
from lora_helpers import max_diff, merged_by_peft

import moekit
from moekit.errors import UserError
from moekit.lora.extract import ExtractOptions, extract_lora

FULL_TOL = 1e-5
EY_TOL = 1e-5


@pytest.fixture(scope="module")
def low_rank_finetune(tiny_llama, tmp_path_factory):
    """base + (a rank-6 update + small noise) on every 2-D weight, + noise on the rest: a spectrum with a knee."""
    from safetensors.torch import save_file

    base = tiny_llama["base"]
    out = tmp_path_factory.mktemp("lowrank_ft")
    g = torch.Generator().manual_seed(5)
    tuned = {}
    for name, w in load_tensors(base).items():
        if w.dim() == 2:
            m, n = w.shape
            update = torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g) * 0.01
            tuned[name] = w + update + torch.randn(m, n, generator=g) * 1e-4
        else:
            tuned[name] = w + torch.randn(w.shape, generator=g) * 0.01
    save_file(tuned, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    return out


def _adapted(base, adapter, tmp_path):
    cfg = {"merge_method": "passthrough", "models": [{"model": f"{base}+{adapter}"}]}
    return load_tensors(moekit.merge(cfg, tmp_path / "adapted"))


def test_full_rank_reproduces_the_finetune(tiny_llama, tmp_path):
    base, ft = tiny_llama["base"], tiny_llama["ft1"]
    result = extract_lora(str(base), str(ft), tmp_path / "lora", ExtractOptions(max_rank=512))
    want = load_tensors(ft)
    assert max_diff(_adapted(base, tmp_path / "lora", tmp_path), want) <= FULL_TOL
    assert max_diff(merged_by_peft(base, tmp_path / "lora"), want) <= FULL_TOL
    lora = [m for m in result.modules if m.kind == "lora"]
    assert len(lora) == 7 * 4 and all(m.rank == min(m.shape) for m in lora)
    assert result.max_relative_error < 1e-5


@pytest.mark.parametrize("rank", [2, 6])
def test_rank_r_error_is_the_eckart_young_optimum(tiny_llama, low_rank_finetune, tmp_path, rank):
    base, ft = tiny_llama["base"], low_rank_finetune
    result = extract_lora(str(base), str(ft), tmp_path / "lora", ExtractOptions(max_rank=rank))
    b, f = load_tensors(base), load_tensors(ft)
    factors = load_tensors(tmp_path / "lora")
    reported = {m.module: m for m in result.modules if m.kind == "lora"}
    assert len(reported) == 28
    for module, m in reported.items():
        delta = f[f"{module}.weight"].double().numpy() - b[f"{module}.weight"].double().numpy()
        s = np.linalg.svd(delta, compute_uv=False)
        optimum = np.sqrt((s[rank:] ** 2).sum() / (s**2).sum())
        A = factors[f"base_model.model.{module}.lora_A.weight"].double().numpy()
        B = factors[f"base_model.model.{module}.lora_B.weight"].double().numpy()
        achieved = np.linalg.norm(delta - B @ A) / np.linalg.norm(delta)
        assert m.rank == rank and A.shape == (rank, delta.shape[1])
        assert abs(achieved - optimum) <= EY_TOL * max(optimum, 1e-3), (module, achieved, optimum)
        assert abs(m.relative_error - achieved) <= EY_TOL, (module, m.relative_error, achieved)
    if rank == 6:  # the update was rank 6: what is left is the 1e-4 noise
        assert result.max_relative_error < 0.05


def test_peft_loads_and_runs_the_adapter(tiny_llama, low_rank_finetune, tmp_path):
    """PeftModel.from_pretrained gives the same logits as moekit's base+adapter, and generates."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, ft = tiny_llama["base"], low_rank_finetune
    extract_lora(str(base), str(ft), tmp_path / "lora", ExtractOptions(max_rank=6))
    cfg = {"merge_method": "passthrough", "models": [{"model": f"{base}+{tmp_path / 'lora'}"}]}
    adapted_dir = moekit.merge(cfg, tmp_path / "adapted")
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base)), str(tmp_path / "lora")
    )
    ours = AutoModelForCausalLM.from_pretrained(str(adapted_dir))
    with torch.no_grad():
        assert (peft_model(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4
        generated = peft_model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 13)


def test_embedding_lora_and_threshold_options(tiny_llama, low_rank_finetune, tmp_path):
    base, ft = tiny_llama["base"], low_rank_finetune
    b, f = load_tensors(base), load_tensors(ft)
    options = ExtractOptions(max_rank=64, sv_relative=0.01, embed_lora=True, exclude=(r"layers\.3\.",))
    result = extract_lora(str(base), str(ft), tmp_path / "lora", options)
    factors = load_tensors(tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in factors
    # layer 3 gets no LoRA; its norms are still saved whole, as every module named like a saved one (mergekit)
    assert not any("layers.3." in k and ".lora_" in k for k in factors)
    assert "embed_tokens" not in (cfg["modules_to_save"] or [])
    # the rank-6 update stands well above the 1e-4 noise: the relative threshold finds rank 6 everywhere
    assert {m.rank for m in result.modules if m.kind == "lora"} == {6}
    adapted = merged_by_peft(base, tmp_path / "lora")
    embed = "model.embed_tokens.weight"
    assert (adapted[embed] - f[embed]).abs().max().item() <= 1e-3
    assert (adapted[embed] - b[embed]).abs().max().item() > 1e-2  # the embedding did change
    layer3 = "model.layers.3.self_attn.q_proj.weight"
    assert torch.equal(adapted[layer3], b[layer3])


def test_sv_epsilon_include_and_skip_undecomposable(tiny_llama, low_rank_finetune, tmp_path):
    base, ft = tiny_llama["base"], low_rank_finetune
    b, f = load_tensors(base), load_tensors(ft)
    name = "model.layers.0.mlp.down_proj"
    s = torch.linalg.svdvals(f[f"{name}.weight"].double() - b[f"{name}.weight"].double())
    eps = float((s[2] + s[3]) / 2)
    options = ExtractOptions(
        max_rank=64, sv_epsilon=eps, include=(r"mlp\.down_proj",), skip_undecomposable=True
    )
    result = extract_lora(str(base), str(ft), tmp_path / "lora", options)
    kinds = {m.module: (m.kind, m.rank) for m in result.modules}
    assert kinds[name] == ("lora", 3)
    assert all("down_proj" in m or kind == "full" for m, (kind, _) in kinds.items())
    # embeddings still go to modules_to_save (mergekit's default), norms are skipped
    assert {m for m, (kind, _) in kinds.items() if kind == "full"} == {"model.embed_tokens", "lm_head"}


def test_cli_table_errors_and_no_clobber(tiny_llama, tmp_path):
    base, ft = str(tiny_llama["base"]), str(tiny_llama["ft1"])
    out = tmp_path / "lora"
    proc = run_cli("extract-lora", "--base", base, "--model", ft, "-o", str(out), "--rank", "4")
    assert proc.returncode == 0, proc.stderr
    assert "model.layers.0.self_attn.q_proj" in proc.stdout and "rel. error" in proc.stdout
    before = (out / "adapter_model.safetensors").read_bytes()
    again = run_cli("extract-lora", "--base", base, "--model", ft, "-o", str(out), "--rank", "4")
    assert_one_line_error(again, str(out), "--force")
    assert (out / "adapter_model.safetensors").read_bytes() == before
    extract_lora(
        base, ft, out, ExtractOptions(max_rank=2), force=True
    )  # moekit's own output: --force replaces it
    assert load_tensors(out)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 2
    bad = run_cli("extract-lora", "--base", base, "--model", ft, "-o", str(tmp_path / "x"), "-i", "(")
    assert_one_line_error(bad, "--include-regex", "not a valid regular expression")
    assert not (tmp_path / "x").exists()


def test_shape_mismatch_is_refused_before_writing(tiny_llama, tmp_path):
    from moekit.demo.tiny_models import make_base

    wider = make_base(tmp_path / "wider", seed=1, intermediate_size=96, tokenizer=False)
    with pytest.raises(UserError, match="exclude it"):
        extract_lora(str(tiny_llama["base"]), str(wider), tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_biases_of_a_qwen2_finetune_survive_in_peft_and_moekit(tmp_path):
    """Qwen2's q/k/v biases: saved whole (bias: all), since PEFT's lora_bias cannot merge into bias-less layers."""
    from moekit.demo.tiny_models import make_base, make_finetune

    base = make_base(tmp_path / "q2", seed=0, model_type="qwen2", num_layers=2, tokenizer=False)
    ft = make_finetune(base, tmp_path / "q2ft", seed=1)
    extract_lora(str(base), str(ft), tmp_path / "lora", ExtractOptions(max_rank=512))
    want = load_tensors(ft)
    assert not torch.equal(
        want["model.layers.0.self_attn.q_proj.bias"],
        load_tensors(base)["model.layers.0.self_attn.q_proj.bias"],
    )
    assert max_diff(merged_by_peft(base, tmp_path / "lora"), want) <= FULL_TOL
    assert max_diff(_adapted(base, tmp_path / "lora", tmp_path), want) <= FULL_TOL
