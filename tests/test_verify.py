"""`moekit verify`: a good output passes every check; each kind of damage is reported, in one line, by the check
that owns it, naming the file or tensor, and the CLI exits 1.

The damage is done with the safetensors library and plain file edits (independent of moekit's reader), on a
sharded task-arithmetic merge of the tiny Llama models (random inputs, seeded).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import moekit
from moekit.cli import main

SEED = 3


@pytest.fixture(scope="module")
def good(tiny_llama, tmp_path_factory) -> tuple[Path, Path]:
    """(output, config): a DARE merge (random, so the seed matters), cut into several shards."""
    root = tmp_path_factory.mktemp("verify")
    config = root / "dare.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "dare_ties",
                "base_model": str(tiny_llama["base"]),
                "models": [
                    {"model": str(tiny_llama["ft1"]), "parameters": {"weight": 0.6, "density": 0.5}},
                    {"model": str(tiny_llama["ft2"]), "parameters": {"weight": 0.4, "density": 0.7}},
                ],
                "dtype": "float32",
            }
        )
    )
    out = moekit.merge(config, root / "out", seed=SEED, shard_size=200_000, print_fn=lambda *_: None)
    assert len(list(out.glob("*.safetensors"))) > 2
    return out, config


@pytest.fixture()
def damaged(good, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(good[0], copy)
    return copy


def shard_of(out: Path, tensor: str) -> Path:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return out / index["weight_map"][tensor]


def rewrite_tensor(out: Path, tensor: str, change) -> None:
    """Replace one tensor in its shard by change(tensor), keeping every other tensor and the metadata."""
    path = shard_of(out, tensor)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    tensors[tensor] = change(tensors[tensor].clone())
    save_file(tensors, str(path), metadata=metadata)


def check(out: Path, config: Path | None = None, **options) -> list[str]:
    return moekit.verify(out, config=config, seed=SEED, **options).problems


def test_good_output_passes_every_check(good, capsys):
    out, config = good
    report = moekit.verify(out, config=config, seed=SEED)
    assert report.ok, report.problems
    assert [line.split(":")[0] for line in report.passed] == ["files", "finite", "shapes", "loads", "recipe"]
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(out), "--config", str(config), "--seed", str(SEED)])
    assert exit_info.value.code == 0
    assert "all 5 checks passed" in capsys.readouterr().out


def test_flipped_byte_is_found_by_the_rerun(damaged, good):
    name = "model.layers.1.mlp.down_proj.weight"
    # The lowest mantissa bit of one element: still finite, the right shape, so only the rerun can tell.
    rewrite_tensor(damaged, name, _flip_low_bit)
    problems = check(damaged, good[1], load=False)
    assert problems == [f"{shard_of(damaged, name)}: tensor '{name}' differs from the recipe's rerun"]


def _flip_low_bit(t: torch.Tensor) -> torch.Tensor:
    bits = t.contiguous().view(torch.int32).clone()
    bits.view(-1)[7] ^= 1
    return bits.view(torch.float32)


def test_wrong_seed_is_a_problem_with_a_hint(good, damaged):
    problems = moekit.verify(good[0], config=good[1], seed=SEED + 1, load=False).problems
    assert problems and all(rerun_differs(p) for p in problems)
    assert moekit.verify(good[0], config=good[1], load=False).ok  # the seed the output records
    (damaged / "moekit_rerun.yaml").unlink()  # as an older moekit wrote it
    problems = moekit.verify(damaged, config=good[1], load=False).problems  # then the default seed, 0
    assert problems[0].endswith("if the merge ran with --seed N, verify with --seed N")


def rerun_differs(problem: str) -> bool:
    return "differs from the recipe's rerun" in problem or "more problems of this kind" in problem


def test_nan_tensor(damaged, good):
    name = "model.layers.0.self_attn.q_proj.weight"
    rewrite_tensor(damaged, name, lambda t: t.index_put_((torch.tensor([2, 5]),), torch.tensor(float("nan"))))
    problems = check(damaged, good[1], load=False)
    assert (
        f"{shard_of(damaged, name)}: tensor '{name}' has 128 non-finite values of 4096 (128 NaN, 0 inf)"
        in problems
    )
    assert f"{shard_of(damaged, name)}: tensor '{name}' differs from the recipe's rerun" in problems


def test_missing_shard_exits_1(damaged, good, capsys):
    name = "model.layers.2.mlp.up_proj.weight"
    lost = shard_of(damaged, name)
    lost.unlink()
    problems = check(damaged, good[1], load=False, rerun=False)
    assert len(problems) == 1 and f"shard '{lost.name}'" in problems[0] and "is missing" in problems[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(damaged), "--no-rerun"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "problem: " in captured.out and "is missing" in captured.out
    assert "Traceback" not in captured.err


def test_tensor_outside_the_index_and_in_two_shards(damaged):
    index_path = damaged / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dropped = "model.norm.weight"
    del index["weight_map"][dropped]
    index_path.write_text(json.dumps(index))
    name = "model.layers.0.input_layernorm.weight"
    other = next(p for p in sorted(damaged.glob("*.safetensors")) if p != shard_of(damaged, name))
    with safe_open(str(other), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = torch.ones(64)
    save_file(tensors, str(other))
    problems = check(damaged, load=False, rerun=False)
    assert any(f"tensor '{dropped}'" in p and "is not in the index" in p for p in problems)
    assert any(f"tensor '{name}' is in 2 shards" in p for p in problems)


def test_shape_mismatch_against_config(damaged):
    config = json.loads((damaged / "config.json").read_text())
    config["intermediate_size"] = 96  # the tensors say 128
    (damaged / "config.json").write_text(json.dumps(config))
    problems = check(damaged, rerun=False)
    shape_lines = [p for p in problems if "config.json makes it" in p]
    assert len(shape_lines) == 4 * 3  # gate, up, down in each of 4 layers
    assert any("has shape [128, 64], but config.json makes it [96, 64]" in p for p in shape_lines)
    assert any("transformers cannot load it" in p or "mismatched keys" in p for p in problems)


def test_tampered_recipe(damaged, good):
    recipe_path = damaged / "moekit_config.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["models"][0]["parameters"]["weight"] = 0.5
    recipe_path.write_text(yaml.safe_dump(recipe))
    # Against the original config: the recipe is not what ran.
    assert check(damaged, good[1], load=False) == [
        f"{recipe_path}: differs from {good[1]}; the output was not made by that config"
    ]
    # On its own (absolute paths): it reruns, and every merged tensor comes out different.
    problems = check(damaged, load=False)
    assert problems and all(rerun_differs(p) for p in problems)
    assert any("'model.layers.0.mlp.gate_proj.weight'" in p for p in problems)


def test_fused_transformers5_layout_is_refused(tiny_llama, tmp_path):
    """A Mixtral saved in transformers 5's in-memory layout (save_original_format=False, as mergekit-moe writes
    it) loads here but not in transformers 4.x: the shape check says so."""
    from transformers import AutoModelForCausalLM

    config = {
        "base_model": str(tiny_llama["base"]),
        "gate_mode": "random",
        "experts": [{"source_model": str(tiny_llama["ft1"])}, {"source_model": str(tiny_llama["ft2"])}],
        "dtype": "float32",
    }
    moe = moekit.merge(config, tmp_path / "moe", print_fn=lambda *_: None)
    assert moekit.verify(moe, rerun=False, load=False).ok
    fused = tmp_path / "fused"
    AutoModelForCausalLM.from_pretrained(str(moe)).save_pretrained(str(fused), save_original_format=False)
    problems = check(fused, rerun=False, load=False)
    assert len(problems) == 1 and "fused in-memory layout" in problems[0] and "experts" in problems[0]


def test_not_a_directory_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("moekit: error: ")
