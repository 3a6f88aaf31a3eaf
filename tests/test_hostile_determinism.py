"""Determinism: the same config gives bit-identical output directories (every shard, the index, config.json, the
model card), for plain and randomised (DARE) methods with --seed and for MoE random gates, in one process and
across processes with different hash seeds. A different --seed must change a randomised merge (so the equality
checks can fail).
"""

from __future__ import annotations

import os

import pytest
from helpers import run_cli
from hostile_models import micro_models, run_cli_in_process, snapshot, write_yaml

__all__ = ["micro_models"]

SHARDS = ("--shard-size", "4KB")  # a micro model (29 KB) makes ~8 shards and an index at this size


def _dare(m) -> dict:
    return {
        "merge_method": "dare_ties",
        "base_model": str(m["base"]),
        "models": [
            {"model": str(m["ft1"]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(m["ft2"]), "parameters": {"weight": [0.2, 0.9], "density": 0.7}},
            {"model": str(m["ft3"]), "parameters": {"weight": 0.4, "density": 0.3}},
        ],
        "parameters": {"lambda": 0.9},
    }


def _ties(m) -> dict:
    cfg = _dare(m) | {"merge_method": "ties"}
    return cfg


def _moe(m) -> dict:
    return {
        "base_model": str(m["base"]),
        "gate_mode": "random",
        "experts": [{"source_model": str(m[n]), "noise_scale": 0.01} for n in ("ft1", "ft2", "ft3")],
    }


def _merge(config, out, *extra) -> dict[str, bytes]:
    result = run_cli_in_process("merge", str(config), "-o", str(out), *SHARDS, *extra)
    assert result.code == 0, result.stderr
    return snapshot(out)


@pytest.mark.parametrize("make", [_ties, _dare, _moe], ids=["ties", "dare_ties", "moe-random-gates"])
def test_same_config_twice_is_bit_identical(make, micro_models, tmp_path):
    config = write_yaml(tmp_path / "c.yaml", make(micro_models))
    first = _merge(config, tmp_path / "a", "--seed", "7")
    assert "model.safetensors.index.json" in first and sum(f.endswith(".safetensors") for f in first) > 2
    assert _merge(config, tmp_path / "b", "--seed", "7") == first


@pytest.mark.parametrize("make", [_dare, _moe], ids=["dare_ties", "moe-random-gates"])
def test_another_seed_gives_another_output(make, micro_models, tmp_path):
    config = write_yaml(tmp_path / "c.yaml", make(micro_models))
    a = _merge(config, tmp_path / "a", "--seed", "7")
    b = _merge(config, tmp_path / "b", "--seed", "8")
    assert a.keys() == b.keys()  # same layout ...
    assert a["model.safetensors.index.json"] == b["model.safetensors.index.json"]
    assert any(a[f] != b[f] for f in a if f.endswith(".safetensors"))  # ... different random draws


@pytest.mark.slow
def test_identical_across_processes_with_different_hash_seeds(micro_models, tmp_path):
    """Nothing depends on set or dict order under PYTHONHASHSEED, nor on state left over in one process."""
    config = write_yaml(tmp_path / "c.yaml", _dare(micro_models))
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"out{hash_seed}"
        proc = run_cli(
            "merge", str(config), "-o", str(out), *SHARDS, "--seed", "3", env={"PYTHONHASHSEED": hash_seed}
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append(snapshot(out))
    assert outputs[0] == outputs[1]
    assert _merge(config, tmp_path / "in-process", "--seed", "3") == outputs[0]
    assert (
        os.environ.get("PYTHONHASHSEED") != "1"
    )  # the in-process run above did not share the subprocess's seed
