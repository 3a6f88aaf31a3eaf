"""MoE config guards: each user error is one line on stderr with exit code 2, through the CLI, and nothing is
written. The models are made once per module. One case runs `python -m moekit merge` in a fresh process (the real
exit code); the others call the same CLI entry point in-process, which saves a torch import (~2 s) per case."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_cli, write_config

from moekit.demo.tiny_models import make_base


@pytest.fixture(scope="module")
def odd_models(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """A qwen2 model, a llama with another width, one with a bigger vocabulary, and a 'gemma' (llama weights)."""
    root = tmp_path_factory.mktemp("moe_guard_models")
    gemma = root / "gemma"
    shutil.copytree(tiny_llama["base"], gemma)
    cfg = json.loads((gemma / "config.json").read_text())
    (gemma / "config.json").write_text(
        json.dumps({**cfg, "model_type": "gemma", "architectures": ["GemmaForCausalLM"]})
    )
    return {
        "qwen2": make_base(root / "qwen2", seed=1, model_type="qwen2", tokenizer=False),
        "wide": make_base(root / "wide", seed=1, intermediate_size=96, tokenizer=False),
        "vocab": make_base(root / "vocab", seed=1, vocab_size=300, tokenizer=False),
        "gemma": gemma,
    }


def _expert(path, i: int, **extra) -> dict:
    return {"source_model": str(path), "positive_prompts": [f"prompt number {i}"], **extra}


def _cases(m: dict[str, Path]) -> dict[str, tuple[dict, tuple[str, ...]]]:
    base, ft1, ft2 = (str(m[k]) for k in ("base", "ft1", "ft2"))
    ok = {"base_model": base, "gate_mode": "hidden", "experts": [_expert(ft1, 1), _expert(ft2, 2)]}
    return {
        "fewer experts than experts_per_token": (
            {**ok, "experts_per_token": 3},
            ("2 expert(s)", "experts_per_token is 3"),
        ),
        "hidden gates without prompts": (
            {**ok, "experts": [_expert(ft1, 1), {"source_model": ft2}]},
            ("experts[1]", "no positive_prompts", "gate_mode hidden"),
        ),
        "identical prompts": ({**ok, "experts": [_expert(ft1, 1), _expert(ft2, 1)]}, ("same prompts",)),
        "different families": (
            {**ok, "experts": [_expert(ft1, 1), _expert(m["qwen2"], 2)]},
            ("qwen2 model", "llama"),
        ),
        "different shapes": (
            {**ok, "experts": [_expert(ft1, 1), _expert(m["wide"], 2)]},
            ("experts[1]", "[96, 64]", "[128, 64]"),
        ),
        "vocab mismatch": (
            {**ok, "experts": [_expert(ft1, 1), _expert(m["vocab"], 2)]},
            ("300", "256", "tokenizer_source: base"),
        ),
        "unsupported family": (
            {
                **ok,
                "base_model": str(m["gemma"]),
                "experts": [_expert(m["gemma"], 1), _expert(m["gemma"], 2)],
            },
            ("gemma", "llama", "mistral", "qwen2", "qwen3", "Mixtral"),
        ),
        "misspelled key": (
            {**ok, "expert_per_token": 2},
            ("expert_per_token", "did you mean 'experts_per_token'"),
        ),
    }


CASES = list(_cases({k: Path(k) for k in ("base", "ft1", "ft2", "qwen2", "wide", "vocab", "gemma")}))


def _cli_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    from moekit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_info.value.code, captured.out, captured.err)


@pytest.mark.parametrize("case", CASES)
def test_guard_is_one_line_exit_2(tiny_llama, odd_models, tmp_path, capsys, case):
    cfg, needles = _cases({**tiny_llama, **odd_models})[case]
    path = write_config(tmp_path / "moe.yaml", cfg)
    args = ("merge", str(path), "-o", str(tmp_path / "out"))
    proc = run_cli(*args) if case == CASES[0] else _cli_in_process(capsys, *args)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_vocab_mismatch_is_accepted_with_tokenizer_source_base(tiny_llama, odd_models, tmp_path):
    import moekit

    cfg, _ = _cases({**tiny_llama, **odd_models})["vocab mismatch"]
    out = moekit.merge({**cfg, "gate_mode": "random", "tokenizer_source": "base"}, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 256


def test_more_guards_in_process(tiny_llama, tmp_path):
    """The same one-line UserError, checked in-process (the CLI mapping of UserError is tested above)."""
    import moekit
    from moekit.errors import UserError

    base = str(tiny_llama["base"])
    ok = {"base_model": base, "gate_mode": "random", "experts": [{"source_model": base}] * 2}
    cases = [
        ({**ok, "architecture": "mixtral", "shared_experts": [{"source_model": base}]}, "no shared expert"),
        ({**ok, "architecture": "qwen3_moe"}, "cannot be built from llama"),
        ({**ok, "architecture": "deepseek"}, "not supported"),
        ({**ok, "gate_mode": "hiden"}, "did you mean 'hidden'"),
        (
            {"merge_method": "moe", "base_model": base, "gate_mode": "hidden", "upcycle": {"num_experts": 4}},
            "upcycle",
        ),
        (
            {
                "merge_method": "moe",
                "base_model": base,
                "upcycle": {"num_experts": 2},
                "experts": ok["experts"],
            },
            "remove 'experts'",
        ),
        ({**ok, "experts": [{"source_model": base, "noise_scale": -1}] * 2}, "must be >= 0"),
    ]
    for cfg, needle in cases:
        with pytest.raises(UserError, match=needle) as err:
            moekit.merge(cfg, tmp_path / "out")
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_hidden_gates_on_cuda_match_cpu_or_are_refused_without_cuda(tiny_llama, tmp_path):
    """--device cuda: the same router vectors as on CPU (1e-4: GPU kernels sum in another order), or, on a machine
    without CUDA, one clear line before anything is loaded or written."""
    import torch

    import moekit
    from moekit.errors import UserError

    base, ft1, ft2 = (str(tiny_llama[k]) for k in ("base", "ft1", "ft2"))
    cfg = {"base_model": base, "gate_mode": "hidden", "experts": [_expert(ft1, 1), _expert(ft2, 2)]}
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            moekit.merge(cfg, tmp_path / "gpu", device="cuda")
        assert not (tmp_path / "gpu").exists()
        return
    from conftest import load_tensors

    gpu = load_tensors(moekit.merge(cfg, tmp_path / "gpu", device="cuda"))
    cpu = load_tensors(moekit.merge(cfg, tmp_path / "cpu"))
    name = "model.layers.3.block_sparse_moe.gate.weight"
    assert (gpu[name] - cpu[name]).abs().max().item() <= 1e-4
