"""`moekit merge --dry-run`'s memory estimate against the peak resident memory of the real run.

Each case runs the dry run and then the merge, each in a fresh `python -m moekit` process, and measures the
merge's peak RSS (getrusage's ru_maxrss of a wrapper's only child). The estimate (the process after planning,
measured by the dry run, plus the peak of the phase that holds most) must be within TOLERANCE of it, for a dense
ties merge, a `tokenizer: {source: union}` merge whose embedding re-laying dominates, and a clown MoE whose
hidden-state gates load the base model. For the last two, the test also checks that the estimate would miss
without the phase that dominates, so leaving that phase out of the model fails it.

The table of methods (moekit/merging/method_table.py, which the torch-free checks and the estimate read) is
checked against the registry here too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli, write_config
from safetensors.torch import save_file

from moekit.demo.tiny_models import llama_config, make_base, make_finetune

TOLERANCE = 0.25  # |estimate - measured peak RSS| / measured peak RSS, the bound
GIB = 1024**3
# ru_maxrss of the one child this wrapper runs: the child's peak resident memory (KiB on Linux, bytes on macOS)
MEASURE = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stderr.write(done.stderr)\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(peak if sys.platform == 'darwin' else peak * 1024)\n"
    "sys.exit(done.returncode)\n"
)


def measured_peak(config: Path, out: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, sys.executable, "-m", "moekit", "merge", str(config), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def estimate(config: Path, out: Path) -> tuple[int, str, dict[str, int], dict[str, int]]:
    """(estimated peak bytes, the peak phase, its parts {what: bytes}, the other phases {name: bytes})."""
    done = run_cli("merge", str(config), "-o", str(out), "--dry-run")
    assert done.returncode == 0, done.stderr
    head = re.search(r"^peak memory estimate: ([\d.]+) GiB, while (.+):$", done.stdout, re.M)
    assert head, done.stdout
    parts = {what: float(n) * GIB for n, what in re.findall(r"^  \+ ([\d.]+) GiB (.+)$", done.stdout, re.M)}
    base = re.search(r"^  ([\d.]+) GiB this process after planning", done.stdout, re.M)
    parts["process after planning"] = float(base.group(1)) * GIB
    others = {
        name: float(n) * GIB
        for name, n in re.findall(r"^  other phase: (.+): ([\d.]+) GiB$", done.stdout, re.M)
    }
    total = float(head.group(1)) * GIB
    assert total == pytest.approx(sum(parts.values()), abs=0.002 * GIB * len(parts))  # the parts add up
    return int(total), head.group(2), parts, others


def assert_close(estimated: int, measured: int) -> None:
    assert abs(estimated - measured) <= TOLERANCE * measured, (estimated / 2**20, measured / 2**20)


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory) -> dict[str, Path]:
    """A base and two fine-tunes whose MLP tensors (768 x 3072 float32, 9 MiB) dominate their ~70 MiB."""
    root = tmp_path_factory.mktemp("memory_dense")
    base = make_base(root / "base", seed=3, hidden_size=768, intermediate_size=3072, num_layers=2)
    return {
        "base": base,
        "ft1": make_finetune(base, root / "ft1", seed=4, scale=0.02),
        "ft2": make_finetune(base, root / "ft2", seed=5, scale=0.02),
    }


def test_dense_ties_merge(dense_models, tmp_path):
    """ties works on whole tensors: two inputs, the base and ~7 float32 copies of working memory each."""
    m = dense_models
    config = write_config(
        tmp_path / "ties.yaml",
        {
            "merge_method": "ties",
            "base_model": str(m["base"]),
            "models": [
                {"model": str(m["ft1"]), "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": str(m["ft2"]), "parameters": {"weight": 0.4, "density": 0.7}},
            ],
        },
    )
    total, phase, parts, _ = estimate(config, tmp_path / "out")
    assert phase == "writing the tensors"
    assert_close(total, measured_peak(config, tmp_path / "out"))


def word_level_model(out: Path, words: list[str], seed: int, hidden: int) -> Path:
    """A one-layer Llama with a word-level tokenizer of `words` (plus 4 specials) and random weights whose
    embedding and head (one row per token) are most of the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True)
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "<pad>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(str(out))
    inter = 64
    cfg = llama_config(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=inter, num_layers=1)
    (out / "config.json").write_text(json.dumps(cfg))
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    layer = "model.layers.0."
    shapes = {
        "model.embed_tokens.weight": (len(vocab), hidden),
        "lm_head.weight": (len(vocab), hidden),
        "model.norm.weight": (hidden,),
        layer + "input_layernorm.weight": (hidden,),
        layer + "post_attention_layernorm.weight": (hidden,),
        layer + "self_attn.q_proj.weight": (hidden, hidden),
        layer + "self_attn.k_proj.weight": (kv, hidden),
        layer + "self_attn.v_proj.weight": (kv, hidden),
        layer + "self_attn.o_proj.weight": (hidden, hidden),
        layer + "mlp.gate_proj.weight": (inter, hidden),
        layer + "mlp.up_proj.weight": (inter, hidden),
        layer + "mlp.down_proj.weight": (hidden, inter),
    }
    g = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=g) * 0.02 for name, shape in shapes.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_tokenizer_union_merge(tmp_path):
    """Two models sharing half of their 4096 words: the union has 6148 tokens, and re-laying each 1536-wide
    embedding (inputs, gathered rows, fallback rows, re-laid copies: ~300 MB) is the run's peak."""
    words = 4096
    a = word_level_model(tmp_path / "a", [f"w{i}" for i in range(words)], seed=1, hidden=1536)
    b = word_level_model(
        tmp_path / "b", [f"w{i}" for i in range(words // 2, words // 2 + words)], seed=2, hidden=1536
    )
    config = write_config(
        tmp_path / "union.yaml",
        {
            "merge_method": "linear",
            "models": [
                {"model": str(a), "parameters": {"weight": 0.6}},
                {"model": str(b), "parameters": {"weight": 0.4}},
            ],
            "tokenizer": {"source": "union"},
        },
    )
    total, phase, parts, _ = estimate(config, tmp_path / "out")
    measured = measured_peak(config, tmp_path / "out")
    assert_close(total, measured)
    relaying = next(n for what, n in parts.items() if "re-laying them in the output's token order" in what)
    assert (
        total - relaying < (1 - TOLERANCE) * measured
    )  # without the tokenizer phase the estimate would fail


def test_moe_hidden_gates(dense_models, tmp_path):
    """Hidden-state gates load the base model with transformers (its code and the weights in float32) before
    anything is written: that phase, not the write, is the peak."""
    m = dense_models
    prompts = [["def merge(models): return sum", "import torch"], ["The quick brown fox", "hello world"]]
    config = write_config(
        tmp_path / "moe.yaml",
        {
            "base_model": str(m["base"]),
            "gate_mode": "hidden",
            "experts": [
                {"source_model": str(m[name]), "positive_prompts": p}
                for name, p in zip(("ft1", "ft2"), prompts)
            ],
        },
    )
    total, phase, parts, others = estimate(config, tmp_path / "out")
    measured = measured_peak(config, tmp_path / "out")
    assert phase.startswith("computing the router gates (hidden")
    assert_close(total, measured)
    assert others["writing the tensors"] < (1 - TOLERANCE) * measured  # the write alone would miss it


def test_method_table_matches_the_registry():
    """The torch-free table names every registered method with the parameters it declares (per model or
    global), and gives each a working-memory figure."""
    from moekit.merging import methods  # noqa: F401 - registers every method
    from moekit.merging.method_table import METHOD_FACTS
    from moekit.merging.registry import METHODS

    assert sorted(METHOD_FACTS) == sorted(METHODS)
    for name, method in METHODS.items():
        facts = METHOD_FACTS[name]
        assert set(facts.per_model) == {p.name for p in method.params if p.per_model}, name
        assert set(facts.shared) == {p.name for p in method.params if not p.per_model}, name
        assert all(x >= 0 for x in facts.scratch), name
