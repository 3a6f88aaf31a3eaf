"""Shared pieces of the hostile-input suite (tests/test_hostile_*.py): micro models written without transformers
(milliseconds each), broken variants of them, the CLI run in-process, and the "failed cleanly" assertion.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from moekit.demo.tiny_models import llama_config

LITTER_PATTERNS = (".*.moekit-tmp-*", ".*.moekit-old-*", ".*.moekit-lock")
INTERRUPTED = "moekit: interrupted; no output was written"  # what Ctrl-C and SIGTERM print (moekit/cli.py)


def micro_tensors(
    seed: int, hidden: int = 16, intermediate: int = 32, layers: int = 2, vocab: int = 64
) -> dict[str, torch.Tensor]:
    """Random weights with a Llama checkpoint's names and shapes (4 heads, 2 KV heads)."""
    g = torch.Generator().manual_seed(seed)
    kv = hidden // 2

    def rand(*shape):
        return torch.randn(shape, generator=g)

    tensors = {
        "model.embed_tokens.weight": rand(vocab, hidden),
        "lm_head.weight": rand(vocab, hidden),
        "model.norm.weight": 1 + 0.1 * rand(hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": 1 + 0.1 * rand(hidden),
            p + "post_attention_layernorm.weight": 1 + 0.1 * rand(hidden),
            p + "self_attn.q_proj.weight": rand(hidden, hidden),
            p + "self_attn.k_proj.weight": rand(kv, hidden),
            p + "self_attn.v_proj.weight": rand(kv, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, hidden),
            p + "mlp.gate_proj.weight": rand(intermediate, hidden),
            p + "mlp.up_proj.weight": rand(intermediate, hidden),
            p + "mlp.down_proj.weight": rand(hidden, intermediate),
        }
    return tensors


def write_model(
    out: Path,
    seed: int,
    *,
    hidden: int = 16,
    intermediate: int = 32,
    layers: int = 2,
    vocab: int = 64,
    model_type: str = "llama",
) -> Path:
    """A micro Llama-family checkpoint (config.json + model.safetensors, no tokenizer)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(vocab, hidden, intermediate, layers, model_type=model_type)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = micro_tensors(seed, hidden, intermediate, layers, vocab)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def variant(
    src: Path,
    dst: Path,
    config: Callable[[dict], None] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> Path:
    """A copy of model `src` with its config.json and/or its tensors edited in place by the given functions."""
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    if tensors is not None:
        t = load_file(str(dst / "model.safetensors"))
        tensors(t)
        save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def linear_config(*models: Path, **extra) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    } | extra


def write_yaml(path: Path, config: dict | str) -> Path:
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str
    lines: list[str] = field(init=False)

    def __post_init__(self):
        self.lines = [ln for ln in self.stderr.splitlines() if ln.strip()]


def run_cli_in_process(*args: str) -> CliResult:
    """`moekit ARGS` through moekit.cli.main in this process: its exit code, stdout and stderr."""
    from moekit.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code
    assert isinstance(code, int), f"main() ended without an integer exit code: {code!r}"
    return CliResult(code, out.getvalue(), err.getvalue())


def litter(parent: Path) -> list[str]:
    """Temporary or half-renamed output directories left next to an output."""
    return sorted(p.name for pattern in LITTER_PATTERNS for p in parent.glob(pattern))


def assert_failed_cleanly(result: CliResult, out: Path, *needles: str) -> str:
    """Exit 2, one line on stderr ('moekit: error: ...') naming every needle, no traceback, no output, no litter."""
    assert result.code == 2, (result.code, result.stderr)
    assert len(result.lines) == 1, result.stderr
    line = result.lines[0]
    assert line.startswith("moekit: error: "), line
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in line, (needle, line)
    assert not out.exists(), f"{out} was created"
    assert not litter(out.parent), litter(out.parent)
    return line


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by relative path, with its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def build_micro_models(root: Path) -> dict[str, Path]:
    """The models the hostile tables refer to by name: sound ones, and ones that cannot be merged with `base`."""
    m = {name: write_model(root / name, seed) for seed, name in enumerate(["base", "ft1", "ft2", "ft3"])}
    m["qwen"] = write_model(root / "qwen", 4, model_type="qwen2")
    m["wide"] = write_model(root / "wide", 5, hidden=32)
    m["ffn"] = write_model(root / "ffn", 6, intermediate=48)
    m["bigvocab"] = write_model(root / "bigvocab", 7, vocab=80)
    m["deep"] = write_model(root / "deep", 8, layers=4)
    m["noweights"] = root / "noweights"
    m["noweights"].mkdir()
    shutil.copyfile(m["base"] / "config.json", m["noweights"] / "config.json")
    m["noconfig"] = root / "noconfig"
    m["noconfig"].mkdir()
    shutil.copyfile(m["base"] / "model.safetensors", m["noconfig"] / "model.safetensors")
    m["afile"] = root / "weights.safetensors"
    shutil.copyfile(m["base"] / "model.safetensors", m["afile"])
    return m


@pytest.fixture(scope="session")
def micro_models(tmp_path_factory) -> dict[str, Path]:
    return build_micro_models(tmp_path_factory.mktemp("hostile") / "models")


@dataclass(frozen=True)
class Case:
    """One bad input. `config(models, case_dir)` returns the config (a dict, or YAML text for syntax errors) and
    may write broken model files into `case_dir`. Needles (and `args`) must appear in the error line; "{name}"
    expands to the path of micro model `name`, "{dir}" to the case directory and "{config}" to the config file."""

    id: str
    what: str
    config: Callable[[dict[str, Path], Path], dict | str]
    needles: tuple[str, ...]
    args: tuple[str, ...] = ()
    give_out: bool = True  # pass -o (False: rely on the config's `out:`)


def run_case(case: Case, models: dict[str, Path], case_dir: Path) -> tuple[CliResult, Path, list[str]]:
    """Write the case's inputs, run `moekit merge` on them in-process; (result, output dir, expanded needles)."""
    case_dir.mkdir(parents=True)
    config_path = write_yaml(case_dir / "config.yaml", case.config(models, case_dir))
    out = case_dir / "out"
    names = {k: str(v) for k, v in models.items()} | {"dir": str(case_dir), "config": str(config_path)}
    extra = [a.format(**names) for a in case.args]
    args = ["merge", str(config_path), *(["-o", str(out)] if case.give_out else []), *extra]
    return run_cli_in_process(*args), out, [n.format(**names) for n in case.needles]
