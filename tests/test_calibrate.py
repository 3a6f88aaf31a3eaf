"""`moekit calibrate-router`: only routers change, the label objective routes as asked, --steps 0 is a copy, and
bad input is one line with exit code 2.

The routing check is independent of moekit's evaluation: it reads the router logits of the calibrated model from
transformers' `output_router_logits` and counts top-1 choices itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_tensors
from helpers import assert_one_line_error, run_cli

import moekit

# Two labels with disjoint tokens (digits vs letters), so a router can tell them apart from the embedding alone.
DIGITS = ["0 1 2 3 4 5 6 7 8 9 " * 6 + str(i) for i in range(12)]
LETTERS = ["the quick brown fox jumps over the lazy dog " * 3 + "abc"[i % 3] for i in range(12)]


@pytest.fixture(scope="module")
def clown(tiny_llama, tmp_path_factory) -> Path:
    """A 2-expert top-1 Mixtral from ft1 (expert 0) and ft2 (expert 1) with small random routers."""
    cfg = {
        "base_model": str(tiny_llama["base"]),
        "gate_mode": "uniform_random",
        "experts_per_token": 1,
        "experts": [{"source_model": str(tiny_llama["ft1"])}, {"source_model": str(tiny_llama["ft2"])}],
    }
    return moekit.merge(cfg, tmp_path_factory.mktemp("clown") / "moe", seed=4)


def _top1_shares(model_dir: Path, texts: list[str], expert: int) -> float:
    """Share of (token, layer) top-1 choices that pick `expert`, from transformers' own router logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hits = total = 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt").input_ids
            for logits in model(input_ids=ids, output_router_logits=True).router_logits:
                top1 = logits.argmax(dim=-1)
                hits += int((top1 == expert).sum())
                total += top1.numel()
    return hits / total


def test_label_objective_routes_labelled_tokens_to_their_experts(clown, tmp_path):
    """Hand-built target: digits -> expert 0 (ft1), letters -> expert 1 (ft2). Before: the random router's split;
    after 40 steps: >= 85% of held-out top-1 choices where asked, and every non-router tensor byte-identical."""
    data = {"ft1": DIGITS[:9], "ft2": LETTERS[:9]}
    heldout = {"ft1": DIGITS[9:], "ft2": LETTERS[9:]}
    result = moekit.calibrate_router(
        clown, data, tmp_path / "cal", heldout=heldout, steps=40, lr=0.03, objective="label", window=32
    )
    assert result.targets == {"ft1": [0], "ft2": [1]}
    out = result.out
    assert _top1_shares(out, heldout["ft1"], 0) >= 0.85 and _top1_shares(out, heldout["ft2"], 1) >= 0.85
    # moekit's own held-out report (windows of 32 tokens, BOS first) agrees: up from the random router's split
    share_before, share_after = result.before.intended_share, result.after.intended_share
    assert min(share_after.values()) >= 0.8 and min(share_before.values()) < 0.5
    assert result.after.mutual_information_bits > result.before.mutual_information_bits

    before, after = load_tensors(clown), load_tensors(out)
    assert sorted(before) == sorted(after)
    routers = {k for k in before if k.endswith("block_sparse_moe.gate.weight")}
    assert len(routers) == 4 and all(not torch.equal(before[k], after[k]) for k in routers)
    for name in set(before) - routers:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    assert json.loads((out / "config.json").read_text()) == json.loads((clown / "config.json").read_text())
    card = (out / "README.md").read_text()
    assert "Router calibration" in card and "ft1 tokens to the ft1 expert" in card
    assert json.loads((out / "moekit_calibration.json").read_text())["settings"]["steps"] == 40


def test_zero_steps_reproduces_the_input_exactly(clown, tmp_path):
    data = {"ft1": DIGITS, "ft2": LETTERS}
    result = moekit.calibrate_router(clown, data, tmp_path / "copy", steps=0, window=32)
    before, after = load_tensors(clown), load_tensors(result.out)
    assert sorted(before) == sorted(after)
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    assert result.before == result.after


def test_lm_objective_trains_a_top2_router_and_keeps_perplexity(tiny_llama, tmp_path):
    """With k = 2 the LM loss reaches the router through the top-k weights: the routers move, perplexity on the
    training text does not rise (a few small steps), and only router tensors differ."""
    cfg = {
        "base_model": str(tiny_llama["base"]),
        "gate_mode": "random",
        "experts_per_token": 2,
        "experts": [{"source_model": str(tiny_llama[m])} for m in ("ft1", "ft2", "ft3")],
    }
    moe = moekit.merge(cfg, tmp_path / "moe", seed=2)
    data = {"a": DIGITS + LETTERS}
    result = moekit.calibrate_router(
        moe, data, tmp_path / "lm", heldout=data, steps=8, lr=0.01, objective="lm", window=32
    )
    assert result.after.perplexity["a"] <= result.before.perplexity["a"] * 1.0001
    before, after = load_tensors(moe), load_tensors(result.out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.endswith("block_sparse_moe.gate.weight")}


def test_lm_objective_trains_a_top1_router(clown, tmp_path):
    """Top-1 Mixtral: the router's one renormalised weight is always 1, so its only LM signal is the straight-
    through one. A few steps must lower the perplexity of the text trained on, and change only the routers."""
    data = {"ft1": DIGITS + LETTERS}
    result = moekit.calibrate_router(
        clown, data, tmp_path / "lm1", heldout=data, steps=8, lr=0.03, objective="lm", window=32
    )
    assert result.after.perplexity["ft1"] < result.before.perplexity["ft1"] * 0.999
    before, after = load_tensors(clown), load_tensors(result.out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.endswith("block_sparse_moe.gate.weight")}


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(clown, tiny_llama, tmp_path):
    good = tmp_path / "digits.txt"
    good.write_text("\n".join(DIGITS))
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    out = str(tmp_path / "out")
    cases = [
        ([str(clown), "--data", f"ft1={tmp_path / 'missing.txt'}"], "prompts file not found"),
        ([str(clown), "--data", f"ft1={tmp_path / 'binary.txt'}"], "not UTF-8"),
        ([str(clown), "--data", f"cod={good}"], "label 'cod' names no expert source"),
        ([str(tiny_llama["base"]), "--data", f"ft1={good}"], "dense model"),
        ([str(clown), "--data", f"ft1={good}", "--objective", "labl"], "did you mean 'label'"),
    ]
    for args, needle in cases:
        proc = run_cli("calibrate-router", *args, "-o", out)
        assert_one_line_error(proc, needle)
        assert not Path(out).exists()
