"""Two mergekit config forms: `modules:` (per-module models/slices/parameters) and `--unsafe-truncate-embeddings`.

A model whose layers form one stack has one module, which mergekit names 'default': a `modules: {default: ...}`
config merges as that module's models/slices say, its parameters ranking between a slice's and the global ones
(mergekit's ConfigReader: slice source > slice > module > global, a filter that matches nothing falling through).
With --unsafe-truncate-embeddings, embeddings of different vocabulary sizes are narrowed to the rows all inputs
have, as mergekit's TruncatedVocabulary does. The references are computed here per tensor in float64 from the
inputs as stored (tolerance 1e-6 relative)."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import load_tensors
from helpers import assert_one_line_error, run_cli, write_config
from hostile_models import write_model

import moekit
from moekit.errors import UserError


def _models(tmp_path, n=3, **shape):
    seeds = torch.randint(0, 2**31, (n,)).tolist()
    return [write_model(tmp_path / f"m{i}", s, **shape) for i, s in enumerate(seeds)]


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool((got.double() - want).abs().max() <= 1e-6 * max(1.0, float(want.abs().max())))


def test_single_module_parameters_rank_between_slice_and_global(tmp_path):
    a, b = _models(tmp_path, 2)
    cfg = {
        "merge_method": "linear",
        "modules": {
            "default": {
                "slices": [
                    {
                        "sources": [
                            {"model": str(a), "layer_range": [0, 2], "parameters": {"weight": 0.7}},
                            {"model": str(b), "layer_range": [0, 2]},
                        ],
                        "parameters": {"weight": [{"filter": "self_attn", "value": 0.2}]},
                    }
                ],
                "parameters": {"weight": [{"filter": "mlp", "value": 2.5}]},
            }
        },
        "parameters": {"weight": 1.3},
    }
    got = load_tensors(moekit.merge(cfg, tmp_path / "out"))
    ta, tb = load_tensors(a), load_tensors(b)
    assert set(got) == set(ta)
    for k in ta:
        wb = 0.2 if "self_attn" in k else 2.5 if "mlp" in k else 1.3
        want = (0.7 * ta[k].double() + wb * tb[k].double()) / (0.7 + wb)
        assert _close(got[k], want), k


def test_single_module_models_form_equals_the_top_level_config(tmp_path):
    """`modules: {default: {models, parameters}}` is the top-level config with the module's parameters (here
    below a per-model weight and above nothing global): bit-identical outputs."""
    base, a, b = _models(tmp_path, 3)
    models = [{"model": str(a), "parameters": {"weight": 0.6}}, {"model": str(b)}]
    params = {"weight": 0.35, "density": 0.5}
    top = {"merge_method": "ties", "base_model": str(base), "models": models, "parameters": params}
    mod = {
        "merge_method": "ties",
        "base_model": str(base),
        "modules": {"default": {"models": models, "parameters": params}},
    }
    want = load_tensors(moekit.merge(top, tmp_path / "top"))
    got = load_tensors(moekit.merge(mod, tmp_path / "mod"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "modules, needles",
    [
        (
            lambda m: {
                "text_decoder": {"models": [{"model": m}]},
                "vision_tower": {"models": [{"model": m}]},
            },
            ("modules: text_decoder, vision_tower", "LlamaForCausalLM", "'default'"),
        ),
        (
            lambda m: {"text_decoder": {"models": [{"model": m}]}},
            ("modules.text_decoder", "LlamaForCausalLM"),
        ),
        (
            lambda m: {"default": {"modles": [{"model": m}]}},
            ("modules.default", "'modles'", "did you mean 'models'"),
        ),
        (
            lambda m: {"default": {"models": [{"model": m}], "slices": []}},
            ("modules.default", "exactly one of 'models' or 'slices'"),
        ),
    ],
)
def test_modules_refusals_are_one_line(tmp_path, modules, needles):
    (a,) = _models(tmp_path, 1)
    cfg = write_config(tmp_path / "c.yaml", {"merge_method": "linear", "modules": modules(str(a))})
    proc = run_cli("merge", str(cfg), str(tmp_path / "out"))
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out").exists()


def test_modules_and_models_together_are_refused(tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": "x"}], "modules": {"default": {"models": ["x"]}}}
    with pytest.raises(UserError, match="exactly one of 'models', 'slices' or 'modules'"):
        moekit.merge(cfg, tmp_path / "out")


def _vocab_family(tmp_path):
    """mergekit's own mismatched-vocabulary test: two 64-token models and a 66-token one, otherwise alike."""
    seeds = torch.randint(0, 2**31, (3,)).tolist()
    return [write_model(tmp_path / f"v{i}", s, vocab=v) for i, (s, v) in enumerate(zip(seeds, [64, 64, 66]))]


def test_unsafe_truncate_embeddings_keeps_the_common_rows(tmp_path):
    """mergekit's TruncatedVocabulary: each input's embedding and head narrowed to the smallest vocabulary (64
    rows), then merged; the other tensors as usual. config.json's vocab_size follows the rows, so transformers
    loads the output. Checked against a float64 mean of the first 64 rows, and the warning names each tensor."""
    import json
    import subprocess

    paths = _vocab_family(tmp_path)
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "merge_method": "linear",
            "models": [{"model": str(p)} for p in paths],
            "parameters": {"weight": 1.0},
        },
    )
    proc = run_cli("merge", str(cfg), str(tmp_path / "out"), "--unsafe-truncate-embeddings")
    assert proc.returncode == 0, proc.stderr
    for tensor in ("model.embed_tokens.weight", "lm_head.weight"):
        assert f"tensor '{tensor}'" in proc.stderr and "truncated to [64, 16]" in proc.stderr
    got = load_tensors(tmp_path / "out")
    inputs = [load_tensors(p) for p in paths]
    for k in got:
        rows = got[k].shape[0] if k in ("model.embed_tokens.weight", "lm_head.weight") else None
        assert rows in (None, 64), k
        want = sum(t[k][:rows].double() for t in inputs) / 3
        assert _close(got[k], want), k
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 64
    load = "import sys, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
    load += "print(m.get_input_embeddings().weight.shape[0])"
    loaded = subprocess.run(
        [sys.executable, "-c", load, str(tmp_path / "out")], capture_output=True, text=True, timeout=300
    )
    assert loaded.returncode == 0 and loaded.stdout.split()[-1] == "64", loaded.stderr


def test_vocabulary_mismatch_without_the_flag_names_tensor_shapes_and_flag(tmp_path):
    paths = _vocab_family(tmp_path)
    cfg = write_config(
        tmp_path / "c.yaml", {"merge_method": "linear", "models": [{"model": str(p)} for p in paths]}
    )
    proc = run_cli("merge", str(cfg), str(tmp_path / "out"))
    assert_one_line_error(
        proc,
        "model.embed_tokens.weight",
        "[64, 16]",
        "[66, 16]",
        "--unsafe-truncate-embeddings",
        "tokenizer_source",
    )
    assert not (tmp_path / "out").exists()


def test_unsafe_truncate_embeddings_is_refused_for_moe_builds(tmp_path):
    (base,) = _models(tmp_path, 1)
    moe = {"base_model": str(base), "gate_mode": "random", "experts": [{"source_model": str(base)}] * 2}
    with pytest.raises(UserError, match="--unsafe-truncate-embeddings apply to dense merges"):
        moekit.merge(moe, tmp_path / "out", unsafe_truncate_embeddings=True)
