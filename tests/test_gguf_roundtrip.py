"""The llama.cpp round trip: moekit's outputs through llama.cpp's own converter, read back with gguf-py.

For a dense Llama merge, a Mixtral clown-MoE, a Mixtral upcycle, a Qwen2-MoE with a shared expert (from a base
with tied embeddings) and a Qwen3-MoE upcycle, `convert_hf_to_gguf.py` from the `llama-cpp-python` sdist (fetched
with pip and cached, see bench/_llama_cpp.py) must succeed, and every GGUF tensor must equal, exactly (f32), the
HF tensor it comes from, under a name and shape mapping written here from llama.cpp's tensor tables: experts
stacked per layer, and Llama's q/k rows reordered from rotate-half pairs to interleaved pairs. Loading the GGUF in
llama.cpp and comparing logits needs a C++ build, which is too slow for the suite: bench/gguf_roundtrip.py does it.

The models are tiny (2 layers, hidden 64) but carry SmolLM2's real tokenizer: the converter refuses a BPE
tokenizer whose pre-tokenizer it does not recognise.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_tensors

import moekit
from moekit.demo.smollm2 import smollm2_checkpoint
from moekit.demo.tiny_models import make_base, make_finetune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _llama_cpp  # noqa: E402

VOCAB = 49152  # SmolLM2's
LAYERS = 2
PROMPTS = (
    ["def main():", "import numpy as np"],
    ["Permission is hereby granted", "THE SOFTWARE IS PROVIDED"],
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    root = tmp_path_factory.mktemp("gguf_src")

    def base(name: str, seed: int, **kw) -> Path:
        out = make_base(root / name, seed=seed, tokenizer=False, vocab_size=VOCAB, num_layers=LAYERS, **kw)
        tokenizer.save_pretrained(str(out))
        return out

    llama = base("llama", 0)
    qwen2 = base("qwen2", 4, model_type="qwen2", tie_word_embeddings=True)
    return {
        "llama": llama,
        "llama_ft1": make_finetune(llama, root / "llama_ft1", seed=1),
        "llama_ft2": make_finetune(llama, root / "llama_ft2", seed=2),
        "qwen2": qwen2,
        "qwen2_ft": make_finetune(qwen2, root / "qwen2_ft", seed=6),
        "qwen3": base("qwen3", 5, model_type="qwen3"),
    }


def _configs(s: dict[str, Path]) -> dict[str, dict]:
    p = {k: str(v) for k, v in s.items()}
    clown = [{"source_model": p[f"llama_ft{i + 1}"], "positive_prompts": PROMPTS[i]} for i in range(2)]
    qwen_experts = [
        {"source_model": p[m], "positive_prompts": PROMPTS[i]} for i, m in enumerate(("qwen2", "qwen2_ft"))
    ]
    return {
        "dense_linear": {
            "merge_method": "linear",
            "models": [{"model": p["llama_ft1"], "parameters": {"weight": 0.5}}, {"model": p["llama_ft2"], "parameters": {"weight": 0.5}}],
        },
        "mixtral_clown": {"base_model": p["llama"], "gate_mode": "hidden", "experts_per_token": 1, "experts": clown},
        "mixtral_upcycle": {"base_model": p["llama"], "gate_mode": "random", "upcycle": {"num_experts": 4}},
        "qwen2_moe_shared": {
            "base_model": p["qwen2"], "gate_mode": "hidden", "experts_per_token": 2, "experts": qwen_experts,
            "shared_experts": [{"source_model": p["qwen2"]}],
        },
        "qwen3_moe_upcycle": {
            "base_model": p["qwen3"], "gate_mode": "random", "experts_per_token": 2,
            "upcycle": {"num_experts": 4, "noise_scale": 0.01},
        },
    }  # fmt: skip


# HF name (after `model.layers.L.`) -> GGUF name (after `blk.L.`), from llama.cpp's tensor tables.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"self_attn.{x}_proj.{w}": f"attn_{y}.{w}" for x, y in zip("qkvo", ("q", "k", "v", "output")) for w in ("weight", "bias")},
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    **{f"mlp.{r}_proj.weight": f"ffn_{r}.weight" for r in ("gate", "up", "down")},
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    **{f"mlp.shared_expert.{r}_proj.weight": f"ffn_{r}_shexp.weight" for r in ("gate", "up", "down")},
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}  # fmt: skip
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
EXPERT = re.compile(
    r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight"
)
EXPERT_ROLE = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}  # fmt: skip


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Llama's q/k rows as llama.cpp stores them: within each head, HF's rotate-half order (all first halves of the
    rotary pairs, then all second halves) becomes interleaved pairs, GGUF row 2i+p = HF row p*d/2 + i."""
    d = weight.shape[0] // heads
    rows = [h * d + p * (d // 2) + i for h in range(heads) for i in range(d // 2) for p in (0, 1)]
    return weight[rows]


def expected_gguf(model_dir: Path) -> dict[str, np.ndarray]:
    """The GGUF tensors that `model_dir` should convert to, computed from its safetensors."""
    import json

    config = json.loads((model_dir / "config.json").read_text())
    llama_rope = config["model_type"] in ("llama", "mixtral")
    tensors = {k: v.float() for k, v in load_tensors(model_dir).items()}
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name in GLOBAL_NAMES:
            out[GLOBAL_NAMES[name]] = t.numpy()
            continue
        if m := EXPERT.fullmatch(name):
            experts.setdefault((int(m[1]), EXPERT_ROLE[m[3]]), {})[int(m[2])] = t
            continue
        layer, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name).groups()
        if llama_rope and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            heads = config["num_attention_heads" if "q_proj" in rest else "num_key_value_heads"]
            t = interleave_rope_rows(t, heads)
        out[f"blk.{layer}.{LAYER_NAMES[rest]}"] = t.numpy()
    for (layer, role), by_expert in experts.items():
        out[f"blk.{layer}.ffn_{role}_exps.weight"] = torch.stack(
            [by_expert[e] for e in sorted(by_expert)]
        ).numpy()
    return out


def read_gguf(path: Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        assert t.tensor_type == GGMLQuantizationType.F32, (t.name, t.tensor_type)
        tensors[t.name] = np.asarray(t.data)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    return tensors, fields


CASES = {
    "dense_linear": ("llama", None, None),
    "mixtral_clown": ("llama", 2, 1),
    "mixtral_upcycle": ("llama", 4, 2),
    "qwen2_moe_shared": ("qwen2moe", 2, 2),
    "qwen3_moe_upcycle": ("qwen3moe", 4, 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_converts_and_the_gguf_holds_the_hf_tensors(sources, tmp_path, case):
    arch, n_experts, k = CASES[case]
    out = moekit.merge(_configs(sources)[case], tmp_path / case, seed=1)
    gguf_file = tmp_path / f"{case}.gguf"
    proc = _llama_cpp.convert(out, gguf_file)
    assert proc.returncode == 0, proc.stderr[-3000:]

    got, fields = read_gguf(gguf_file)
    want = expected_gguf(out)
    if "output.weight" not in want:  # tied: llama.cpp falls back to the token embedding (Llama, Mixtral)
        assert arch == "llama"
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].size == value.size, name
        # exact: f32 in, f32 out; the shared-expert gate [1, H] is stored as a vector of H
        np.testing.assert_array_equal(got[name].reshape(value.shape), value, err_msg=name)

    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == LAYERS
    if n_experts:
        assert fields[f"{arch}.expert_count"] == n_experts and fields[f"{arch}.expert_used_count"] == k
    if arch == "qwen2moe":
        # fixes for llama.cpp: an lm_head of its own (the base ties it) and a gate that is not 0 (silu(x)/x is NaN)
        np.testing.assert_array_equal(got["output.weight"], got["token_embd.weight"])
        gates = [v for n, v in got.items() if n.endswith("ffn_gate_inp_shexp.weight")]
        assert len(gates) == LAYERS and all((g == np.float32(1e-30)).all() for g in gates)


FUSED = re.compile(r"experts\.(gate_up_proj|down_proj|gate_proj|up_proj)(\.weight)?$")


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c != "dense_linear"])
def test_moe_outputs_hold_per_expert_names_only(sources, tmp_path, case):
    """Regression: every expert tensor is per-expert (`experts.E.<proj>.weight`), none is fused into one 3D tensor
    (transformers 5's in-memory layout, which transformers 4.x loads as random experts)."""
    names = list(load_tensors(moekit.merge(_configs(sources)[case], tmp_path / case, seed=1)))
    assert not [n for n in names if FUSED.search(n)]
    expert_names = [n for n in names if ".experts." in n]
    assert expert_names and all(EXPERT.fullmatch(n) for n in expert_names)
    n_experts = CASES[case][1]
    assert len(expert_names) == LAYERS * n_experts * 3
