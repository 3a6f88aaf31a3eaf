"""The foundation: linear, task_arithmetic and passthrough give the formula's numbers and load in transformers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_tensors
from helpers import assert_one_line_error, run_cli, write_config

import moekit

TOL = 1e-6  # fp32: the bound on |moekit - formula|


def _random_weights(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [round(float(x), 4) for x in torch.rand(n, generator=g) * 1.5 + 0.1]


def test_linear_matches_formula(tiny_llama, tmp_path):
    w = _random_weights(3, seed=11)
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(tiny_llama[k]), "parameters": {"weight": wi}}
            for k, wi in zip(["ft1", "ft2", "ft3"], w)
        ],
        "dtype": "float32",
    }
    out = moekit.merge(cfg, tmp_path / "out")
    got = load_tensors(out)
    srcs = [load_tensors(tiny_llama[k]) for k in ["ft1", "ft2", "ft3"]]
    assert set(got) == set(srcs[0])
    for name, t in got.items():
        want = sum(wi * s[name] for wi, s in zip(w, srcs)) / sum(w)
        assert (t - want).abs().max().item() <= TOL, name


def test_task_arithmetic_matches_formula_with_gradient(tiny_llama, tmp_path):
    lam = 0.7
    grad = [0.2, 1.3]  # weight of ft1 goes 0.2 -> 1.3 over the 4 layers
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_llama["base"]),
        "models": [
            {"model": str(tiny_llama["ft1"]), "parameters": {"weight": grad}},
            {"model": str(tiny_llama["ft2"]), "parameters": {"weight": 0.45}},
        ],
        "parameters": {"lambda": lam},
    }
    out = moekit.merge(cfg, tmp_path / "out")
    got = load_tensors(out)
    base, f1, f2 = (load_tensors(tiny_llama[k]) for k in ["base", "ft1", "ft2"])
    n_layers = 4
    for name, t in got.items():
        if name.startswith("model.layers."):
            pos = int(name.split(".")[2]) / (n_layers - 1)
        else:
            pos = 0.0  # mergekit 0.1.5 evaluates gradients at t = 0 for every non-layer tensor
        w1 = grad[0] + (grad[1] - grad[0]) * pos
        want = base[name] + lam * (w1 * (f1[name] - base[name]) + 0.45 * (f2[name] - base[name]))
        assert (t - want).abs().max().item() <= TOL, name


def test_passthrough_frankenmerge_stacks_layers(tiny_llama, tmp_path):
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(tiny_llama["ft1"]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(tiny_llama["ft2"]), "layer_range": [1, 4]}]},
        ],
    }
    out = moekit.merge(cfg, tmp_path / "out")
    got = load_tensors(out)
    f1, f2 = load_tensors(tiny_llama["ft1"]), load_tensors(tiny_llama["ft2"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    layer_src = [(f1, 0), (f1, 1), (f1, 2), (f2, 1), (f2, 2), (f2, 3)]
    for name, t in got.items():
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            src, j = layer_src[i]
            want = src[name.replace(f"layers.{i}.", f"layers.{j}.", 1)]
        else:
            want = (f1 if "embed" in name else f2)[name]
        assert torch.equal(t, want), name


@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "passthrough"])
def test_output_loads_and_generates(tiny_llama, tmp_path, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method == "passthrough":
        cfg = {"merge_method": method, "slices": [
            {"sources": [{"model": str(tiny_llama["ft1"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(tiny_llama["ft2"]), "layer_range": [1, 4]}]},
        ]}  # fmt: skip
    else:
        cfg = {"merge_method": method, "models": [
            {"model": str(tiny_llama["ft1"]), "parameters": {"weight": 0.6}},
            {"model": str(tiny_llama["ft2"]), "parameters": {"weight": 0.4}},
        ]}  # fmt: skip
        if method != "linear":  # linear would average a base_model in, as mergekit does
            cfg["base_model"] = str(tiny_llama["base"])
    out = moekit.merge(cfg, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def merge(models):", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 5
    # The loaded weights are the merged file's, not a random init.
    state = model.state_dict()
    files = load_tensors(out)
    for name, t in files.items():
        assert torch.equal(state[name], t), name


def test_sharded_output_and_index(tiny_llama, tmp_path):
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(tiny_llama["ft1"]), "parameters": {"weight": 1.0}}],
    }
    out = moekit.merge(cfg, tmp_path / "out", shard_size=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    got, src = load_tensors(out), load_tensors(tiny_llama["ft1"])
    assert set(got) == set(src) and all(torch.equal(got[k], src[k]) for k in src)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in src.values())
    for name in (
        "config.json",
        "tokenizer.json",
        "README.md",
        "moekit_config.yaml",
        "generation_config.json",
    ):
        assert (out / name).is_file(), name


def test_errors_are_one_line_and_leave_nothing(tiny_llama, tmp_path):
    out = tmp_path / "out"
    cases = [
        (
            {
                "merge_method": "linear",
                "models": [{"model": str(tmp_path / "nope"), "parameters": {"weight": 1}}],
            },
            "does not exist",
        ),
        ({"merge_method": "lineer", "models": [{"model": str(tiny_llama["ft1"])}]}, "did you mean 'linear'"),
        (
            {
                "merge_method": "linear",
                "models": [{"model": str(tiny_llama["ft1"]), "parameters": {"wieght": 1}}],
            },
            "did you mean 'weight'",
        ),
    ]
    for i, (cfg, needle) in enumerate(cases):
        proc = run_cli("merge", str(write_config(tmp_path / f"c{i}.yaml", cfg)), "-o", str(out))
        assert_one_line_error(proc, needle)
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_existing_output_needs_force(tiny_llama, tmp_path):
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "merge_method": "linear",
            "models": [{"model": str(tiny_llama["ft1"]), "parameters": {"weight": 1}}],
        },
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "moekit_config.yaml").write_text("{}\n")  # an earlier moekit output: --force may replace it
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(run_cli("merge", str(cfg), "-o", str(out)), "--force")
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli("merge", str(cfg), "-o", str(out), "--force").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    # A directory that holds no model is never replaced, even with --force.
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    assert_one_line_error(run_cli("merge", str(cfg), "-o", str(precious), "--force"), "refusing to replace")
    assert (precious / "notes.txt").read_text() == "keep"


def test_writer_flushes_in_background_and_reports_a_failed_flush(tmp_path, monkeypatch):
    """Shards are flushed to disk on a thread as they grow; a write-back error there (reported once by Linux)
    must surface at close, not be swallowed by the thread."""
    import errno
    import os

    from moekit.io import writer as writer_module

    monkeypatch.setattr(writer_module, "SYNC_EVERY", 1000)
    tensors = {f"t{i}": torch.randn(int(torch.randint(300, 900, ()))) for i in range(6)}
    specs = [writer_module.OutputTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]

    synced = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    good = writer_module.ShardedWriter(tmp_path / "good", specs, shard_size=1 << 30)
    (tmp_path / "good").mkdir()
    for name, t in tensors.items():
        good.write(name, t)
    good.close()
    assert synced  # the background flush ran
    assert all(torch.equal(load_tensors(tmp_path / "good")[n], t) for n, t in tensors.items())

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    bad = writer_module.ShardedWriter(tmp_path / "bad", specs, shard_size=1 << 30)
    (tmp_path / "bad").mkdir()
    for name, t in tensors.items():
        bad.write(name, t)
    with pytest.raises(OSError, match="Input/output error"):
        bad.close()
