"""`moekit verify OUT` with no flags: the output's moekit_rerun.yaml records the seed and the folder the recipe's
relative paths resolved against (relative to the output), so the rerun reproduces the bytes wherever verify runs
and after the output moves with its inputs. Outputs without the record (older moekit) need --seed/--config, and
verify says so.

Inputs: the tiny Llama models (random weights) copied into a project folder, and a random PEFT LoRA; the merges
are randomised (DARE, random MoE gates), so a wrong seed changes the bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from lora_helpers import peft_adapter
from safetensors import safe_open
from safetensors.torch import save_file

import moekit
from moekit.cli import main


@pytest.fixture()
def project(tiny_llama, tmp_path) -> Path:
    """tmp/proj/models/{base,ft1,ft2,lora} and an empty tmp/proj/configs."""
    proj = tmp_path / "proj"
    for name in ("base", "ft1", "ft2"):
        shutil.copytree(tiny_llama[name], proj / "models" / name)
    peft_adapter(proj / "models" / "base", proj / "models" / "lora", seed=4, r=4, target_modules=["q_proj"])
    (proj / "configs").mkdir()
    return proj


def cli(*args: str, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def flip_low_bit(out: Path, tensor: str) -> Path:
    """The lowest mantissa bit of one element of `tensor`, rewritten with the safetensors library: still finite,
    the same shape, so only the rerun can tell."""
    shard = next(p for p in out.glob("*.safetensors") if tensor in safe_open(str(p), "pt").keys())
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    bits = tensors[tensor].contiguous().view(torch.int32).clone()
    bits.view(-1)[5] ^= 1
    tensors[tensor] = bits.view(torch.float32)
    save_file(tensors, str(shard), metadata=metadata)
    return shard


def test_relative_config_run_elsewhere_verifies_with_no_flags(project, tmp_path, capsys, monkeypatch):
    config = project / "configs" / "dare.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "dare_ties",
                "base_model": "../models/base",
                "models": [
                    {"model": "../models/ft1+../models/lora", "parameters": {"weight": 0.6, "density": 0.5}},
                    {"model": "../models/ft2", "parameters": {"weight": 0.4, "density": 0.7}},
                ],
                "dtype": "float32",
            }
        )
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = cli(
        "merge", "../proj/configs/dare.yaml", "-o", "../proj/out", "--seed", "5", "-q", capsys=capsys
    )
    assert code == 0, err
    record = yaml.safe_load((project / "out" / "moekit_rerun.yaml").read_text())
    assert record == {"seed": 5, "paths_relative_to": "../configs"}
    assert str(tmp_path) not in (project / "out" / "README.md").read_text()

    # The project moves, and verify runs from a third folder: the record is relative, so the rerun still finds
    # the inputs, with the merge's seed.
    moved = tmp_path / "moved"
    project.rename(moved)
    (tmp_path / "third").mkdir()
    monkeypatch.chdir(tmp_path / "third")
    code, out, err = cli("verify", "../moved/out", capsys=capsys)
    assert code == 0, out + err
    assert "rerun (seed 5) gives the same bytes" in out and "all 5 checks passed" in out

    name = "model.layers.2.self_attn.q_proj.weight"  # one the LoRA changed
    shard = flip_low_bit(moved / "out", name)
    code, out, err = cli("verify", "../moved/out", capsys=capsys)
    assert code == 1
    assert [line for line in out.splitlines() if line.startswith("problem: ")] == [
        f"problem: {Path('../moved/out') / shard.name}: tensor '{name}' differs from the recipe's rerun"
    ]
    assert err == "moekit: verify: 1 problem(s) in ../moved/out\n"


def test_seeded_random_gate_moe_verifies_with_no_flags(project, tmp_path, capsys, monkeypatch):
    config = {  # a dict: its relative paths are relative to the working directory of the merge
        "base_model": "models/base",
        "gate_mode": "random",
        "experts": [{"source_model": "models/ft1"}, {"source_model": "models/ft2"}],
        "dtype": "float32",
    }
    monkeypatch.chdir(project)
    out = moekit.merge(config, tmp_path / "moe", seed=11, print_fn=lambda *_: None)
    assert yaml.safe_load((out / "moekit_rerun.yaml").read_text()) == {
        "seed": 11,
        "paths_relative_to": "../proj",
    }
    monkeypatch.chdir(tmp_path)
    code, stdout, err = cli("verify", "moe", capsys=capsys)
    assert code == 0, stdout + err
    assert "rerun (seed 11) gives the same bytes" in stdout

    # --seed still overrides the record, and the gates depend on it: another seed is found out.
    problems = moekit.verify(out, seed=12, load=False).problems
    assert problems and all("differs from the recipe's rerun" in p for p in problems)
    assert any("gate" in p for p in problems), problems

    # An output of an older moekit (no record): the rerun needs the flags, and the problems say which.
    (out / "moekit_rerun.yaml").unlink()
    problems = moekit.verify(out, load=False, rerun=True).problems
    assert len(problems) == 1 and "cannot rerun the recipe" in problems[0]
    assert problems[0].endswith(
        "this output has no moekit_rerun.yaml (an older moekit wrote none): if its paths are relative, pass "
        "--config (the file it ran from)"
    )
    monkeypatch.chdir(project)  # where its relative paths resolve, as --config would say
    problems = moekit.verify(out, load=False).problems
    assert problems[0].endswith(
        "no moekit_rerun.yaml records the merge's seed (an output of an older moekit): if the merge ran with "
        "--seed N, verify with --seed N"
    )
    assert moekit.verify(out, seed=11, load=False).ok


def test_multi_document_config_with_intermediate_dir(project, tmp_path, capsys, monkeypatch):
    docs = [
        {
            "merge_method": "dare_linear",
            "models": [
                {"model": "blend", "parameters": {"weight": 0.5, "density": 0.6}},
                {"model": "../models/ft2", "parameters": {"weight": 0.5, "density": 0.6}},
            ],
            "base_model": "../models/base",
            "dtype": "float32",
        },
        {
            "name": "blend",
            "merge_method": "linear",
            "models": [
                {"model": "../models/ft1", "parameters": {"weight": 0.3}},
                {"model": "../models/base", "parameters": {"weight": 0.7}},
            ],
            "dtype": "float32",
        },
    ]
    (project / "configs" / "multi.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    args = (
        "merge",
        "proj/configs/multi.yaml",
        "-o",
        "final",
        "--intermediate-dir",
        "work",
        "--seed",
        "9",
        "-q",
    )
    code, _, err = cli(*args, capsys=capsys)
    assert code == 0, err
    (tmp_path / "third").mkdir()
    monkeypatch.chdir(tmp_path / "third")
    for out in ("../final", "../work/blend"):
        code, stdout, err = cli("verify", out, "--no-load", capsys=capsys)
        assert code == 0, stdout + err
        assert "rerun (seed 9) gives the same bytes" in stdout


def test_broken_record_is_one_line(project, tmp_path):
    config = project / "configs" / "linear.yaml"
    models = [{"model": f"../models/{m}", "parameters": {"weight": 0.5}} for m in ("ft1", "ft2")]
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    out = moekit.merge(config, tmp_path / "out", print_fn=lambda *_: None)
    record = out / "moekit_rerun.yaml"
    record.write_text("seed: 0\npaths_relative_to: ../proj/configs\nsed: 1\n")
    assert moekit.verify(out, load=False).problems == [
        f"{record}: unknown key 'sed' (did you mean 'seed'?) (moekit writes seed, paths_relative_to, allow_crimes, "
        "unsafe_truncate_embeddings, gate_dtype); fix or delete it, and pass --seed and --config (the file the "
        "merge ran from)"
    ]
    record.unlink()  # as the line says: with no record, the flags rerun it
    assert moekit.verify(out, config=config, seed=0, load=False).ok
