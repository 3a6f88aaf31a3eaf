"""Merging models whose tokenizers differ (tokenizer_source: base | union | path), against a token-by-token reference.

The models: `base` = a trained tokenizer T0 plus an added token "<x>"; `tool_a` = a fine-tune of base with "<tool>"
and "alpha" added; `tool_b` = a fine-tune of a base without "<x>", with "<tool>" and "gamma" added. So "<tool>"
sits at different ids in the two, "<x>" is missing from tool_b only, "alpha" and "gamma" exist in one model each:
every fallback rule of mergekit (donor, base row, mean of the others) is exercised.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_tensors
from safetensors.torch import load_file, save_file

import moekit
from moekit.errors import UserError

TOL = 1e-6  # fp32: the bound on |moekit - formula|
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _add_tokens(src: Path, out: Path, tokens: list[str], seed: int, reserve: int = 0) -> Path:
    """A copy of `src` whose tokenizer has `tokens` added, with vocabulary tensors grown by fresh random rows to
    cover them plus `reserve` unused rows (as hub models reserve rows past their tokenizer)."""
    from transformers import AutoTokenizer

    shutil.copytree(src, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.add_tokens(tokens)
    tok.save_pretrained(str(out))
    g = torch.Generator().manual_seed(seed)
    for f in out.glob("*.safetensors"):
        tensors = load_file(str(f))
        for name in VOCAB_TENSORS:
            t = tensors[name]
            n = max(len(tok) + reserve, t.shape[0])
            extra = torch.randn(n - t.shape[0], t.shape[1], generator=g) * 0.5
            tensors[name] = torch.cat([t, extra.to(t.dtype)]).contiguous()
        save_file(tensors, str(f), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] = n
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory) -> dict[str, Path]:
    from moekit.demo.tiny_models import make_base, make_finetune

    root = tmp_path_factory.mktemp("vocab_models")
    t0 = make_base(root / "t0", seed=5, vocab_size=320)
    base = _add_tokens(t0, root / "base", ["<x>"], seed=6, reserve=7)  # 328 rows for 321 tokens
    tool_a = _add_tokens(
        make_finetune(base, root / "ft_a", seed=7, scale=0.05), root / "tool_a", ["<tool>", "alpha"], 8
    )
    tool_b = _add_tokens(
        make_finetune(t0, root / "ft_b", seed=9, scale=0.05), root / "tool_b", ["<tool>", "gamma"], 10
    )
    return {"t0": t0, "base": base, "tool_a": tool_a, "tool_b": tool_b}


def _vocab(model_dir: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).get_vocab()


def _reference_rows(
    out_vocab: dict[str, int], models: list[Path], base: Path | None, name: str
) -> list[dict[int, torch.Tensor]]:
    """mergekit's rules, one token at a time: per model, output token id -> the row it feeds the merge."""
    vocabs = [_vocab(m) for m in models]
    limits = [json.loads((m / "config.json").read_text())["vocab_size"] for m in models]
    tensors = [load_tensors(m)[name].float() for m in models]
    per_model: list[dict[int, torch.Tensor]] = [{} for _ in models]
    for tok, j in out_vocab.items():
        own = [v[tok] if tok in v and v[tok] < lim else None for v, lim in zip(vocabs, limits)]
        have = [i for i, r in enumerate(own) if r is not None]
        if len(have) == 1:
            fallback = tensors[have[0]][own[have[0]]]
        elif not have:
            fallback = torch.zeros(tensors[0].shape[1])
        elif base is not None and base in models and own[models.index(base)] is not None:
            fallback = tensors[models.index(base)][own[models.index(base)]]
        else:
            fallback = sum(tensors[i][own[i]] for i in have) / len(have)
        for i in range(len(models)):
            per_model[i][j] = tensors[i][own[i]] if own[i] is not None else fallback
    return per_model


def test_union_linear_matches_token_by_token_reference(vocab_models, tmp_path):
    m = vocab_models
    models = [m["base"], m["tool_a"], m["tool_b"]]
    weights = [0.37, 1.21, 0.64]
    pad = 64
    cfg = {
        "merge_method": "linear",
        "base_model": str(m["base"]),
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(models, weights)],
        "tokenizer": {"source": "union", "pad_to_multiple_of": pad},
        "dtype": "float32",
    }
    out = moekit.merge(cfg, tmp_path / "out")
    out_vocab = _vocab(out)
    expected_tokens = set(_vocab(m["base"])) | {"<tool>", "alpha", "gamma"}
    assert set(out_vocab) == expected_tokens
    assert sorted(out_vocab.values()) == list(range(len(out_vocab)))
    got = load_tensors(out)
    n = len(out_vocab)
    rows = -(-n // pad) * pad
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    for name in VOCAB_TENSORS:
        ref = _reference_rows(out_vocab, models, m["base"], name)
        assert got[name].shape[0] == rows
        want = torch.stack([sum(w * r[j] for w, r in zip(weights, ref)) / sum(weights) for j in range(n)])
        assert (got[name][:n] - want).abs().max().item() <= TOL, name
        # Padding rows: each model's mean real row, merged like any other row.
        pad_want = sum(w * torch.stack([r[j] for j in range(n)]).mean(0) for w, r in zip(weights, ref)) / sum(
            weights
        )
        assert (got[name][n:] - pad_want).abs().max().item() <= TOL, name
    # The tokenizer was saved: the new tokens encode to the rows they were merged into.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("gamma") == out_vocab["gamma"]


def test_union_without_base_takes_the_mean_of_the_models_that_have_a_token(vocab_models, tmp_path):
    m = vocab_models
    models = [m["tool_a"], m["base"], m["tool_b"]]
    weights = [0.8, 0.3, 0.5]
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(models, weights)],
        "tokenizer_source": "union",
        "dtype": "float32",
    }
    out = moekit.merge(cfg, tmp_path / "out")
    out_vocab = _vocab(out)
    got = load_tensors(out)["model.embed_tokens.weight"]
    ref = _reference_rows(out_vocab, models, None, "model.embed_tokens.weight")
    want = torch.stack(
        [sum(w * r[j] for w, r in zip(weights, ref)) / sum(weights) for j in range(len(out_vocab))]
    )
    assert got.shape[0] == len(out_vocab)
    assert (got - want).abs().max().item() <= TOL
    # "<x>" is missing from tool_b and, without a base_model, tool_b's stand-in is the mean of the other two rows.
    j = out_vocab["<x>"]
    mean_x = (ref[0][j] + ref[1][j]) / 2
    assert torch.equal(ref[2][j], mean_x)


def test_base_source_task_arithmetic_keeps_the_base_vocabulary(vocab_models, tmp_path):
    m = vocab_models
    lam = 0.8
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(m["base"]),
        "models": [
            {"model": str(m["tool_a"]), "parameters": {"weight": 0.7}},
            {"model": str(m["tool_b"]), "parameters": {"weight": 0.4}},
        ],
        "parameters": {"lambda": lam},
        "tokenizer_source": "base",
        "dtype": "float32",
    }
    out = moekit.merge(cfg, tmp_path / "out")
    out_vocab = _vocab(out)
    assert out_vocab == _vocab(m["base"])
    got = load_tensors(out)
    models = [m["base"], m["tool_a"], m["tool_b"]]
    for name in VOCAB_TENSORS:
        b, a, c = _reference_rows(out_vocab, models, m["base"], name)
        want = torch.stack(
            [b[j] + lam * (0.7 * (a[j] - b[j]) + 0.4 * (c[j] - b[j])) for j in range(len(out_vocab))]
        )
        # The base reserves 328 rows but its tokenizer has 321 tokens: the output keeps one row per token.
        assert got[name].shape[0] == len(out_vocab) == 321
        assert (got[name] - want).abs().max().item() <= TOL, name
    others = {k: v for k, v in got.items() if k not in VOCAB_TENSORS}
    srcs = [load_tensors(p) for p in models]
    for name, t in others.items():
        b, a, c = (s[name].float() for s in srcs)
        assert (t - (b + lam * (0.7 * (a - b) + 0.4 * (c - b)))).abs().max().item() <= TOL, name


def test_model_path_source_loads_and_generates(vocab_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = vocab_models
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(m["tool_a"]), "parameters": {"weight": 0.5}},
            {"model": str(m["tool_b"]), "parameters": {"weight": 0.5}},
        ],
        "tokenizer_source": str(m["tool_b"]),
    }
    out = moekit.merge(cfg, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.get_vocab() == _vocab(m["tool_b"])
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    ids = tok("<tool> gamma merge", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (1, ids.shape[1] + 4)
    assert int(gen.max()) < len(tok)


def test_different_vocab_sizes_without_tokenizer_source_say_which_option(vocab_models, tmp_path):
    m = vocab_models
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(m["tool_a"]), "parameters": {"weight": 1.0}},
            {"model": str(m["tool_b"]), "parameters": {"weight": 1.0}},
        ],
    }
    with pytest.raises(UserError, match="tokenizer_source"):
        moekit.merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_misspelled_tokenizer_source_suggests_union(vocab_models, tmp_path):
    m = vocab_models
    models = [
        {"model": str(m["tool_a"]), "parameters": {"weight": 1.0}},
        {"model": str(m["tool_b"]), "parameters": {"weight": 1.0}},
    ]
    cfg = {"merge_method": "linear", "models": models, "tokenizer_source": "unoin"}
    with pytest.raises(UserError, match="did you mean 'union'"):
        moekit.merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _configured_rows(
    out_vocab: dict[str, int], models: list[Path], base: Path | None, name: str, tokens: dict
) -> list[dict[int, torch.Tensor]]:
    """mergekit's PermutedVocabulary with `tokenizer.tokens`, one token at a time: a configured token takes its
    configured row (zeros, a model's own row of it, or a model's row by id or token) in every model that lacks it,
    or in all models when forced; the other tokens follow the fallback rules of _reference_rows."""
    rows = _reference_rows(out_vocab, models, base, name)
    vocabs = [_vocab(m) for m in models]
    tensors = [load_tensors(m)[name].float() for m in models]
    for tok, (force, kind, model, ref) in tokens.items():
        j = out_vocab[tok]
        if kind == "zero":
            row = torch.zeros(tensors[0].shape[1])
        else:
            i = models.index(model)
            row_id = vocabs[i][tok] if kind == "model" else ref if isinstance(ref, int) else vocabs[i][ref]
            row = tensors[i][row_id]
        for i, v in enumerate(vocabs):
            if force or tok not in v:
                rows[i][j] = row
    return rows


def test_configured_tokens_take_their_rows_as_mergekit(vocab_models, tmp_path):
    """tokenizer.tokens: a forced model row, a new token seeded from another token's row (added to the output
    tokenizer), an unforced zero row (only where a model lacks the token), a row by id; the tokenizer block
    without `source` is mergekit's default, union. Linear merge in fp32 against the per-token formula (1e-6)."""
    m = vocab_models
    models = [m["base"], m["tool_a"], m["tool_b"]]
    weights = torch.rand(3).add(0.2).tolist()
    row_id = int(torch.randint(0, 300, ()))
    tokens = {
        "<tool>": {"source": str(m["tool_b"]), "force": True},
        "<brand_new>": {"source": {"kind": "model_token", "model": str(m["base"]), "token": "<x>"}},
        "gamma": {"source": {"kind": "zero"}},
        "<x>": {
            "source": {"kind": "model_token", "model": str(m["tool_a"]), "token_id": row_id},
            "force": "false",
        },
    }
    cfg = {
        "merge_method": "linear",
        "base_model": str(m["base"]),
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(models, weights)],
        "tokenizer": {"tokens": tokens},
        "dtype": "float32",
    }
    out = moekit.merge(cfg, tmp_path / "out")
    out_vocab = _vocab(out)
    assert set(out_vocab) == set(_vocab(m["base"])) | {"<tool>", "alpha", "gamma", "<brand_new>"}
    assert out_vocab["<brand_new>"] == len(out_vocab) - 1  # added last, after the union
    got = load_tensors(out)
    expected = {
        "<tool>": (True, "model", m["tool_b"], None),
        "<brand_new>": (False, "model_token", m["base"], "<x>"),
        "gamma": (False, "zero", None, None),
        "<x>": (False, "model_token", m["tool_a"], row_id),
    }
    for name in VOCAB_TENSORS:
        ref = _configured_rows(out_vocab, models, m["base"], name, expected)
        want = torch.stack(
            [sum(w * r[j] for w, r in zip(weights, ref)) / sum(weights) for j in range(len(out_vocab))]
        )
        assert (got[name] - want).abs().max().item() <= TOL, name
        # the configured rows differ from the default fallbacks, so the check above can fail
        default = _reference_rows(out_vocab, models, m["base"], name)
        assert not torch.allclose(default[0][out_vocab["<tool>"]], ref[0][out_vocab["<tool>"]])


@pytest.mark.parametrize(
    "entry, needle",
    [
        ({"source": {"kind": "modle_token", "model": "x", "token": "a"}}, "did you mean 'model_token'"),
        ({"source": {"kind": "model_token", "model": "x"}}, "exactly one of token_id and token"),
        ({"sorce": "x"}, "did you mean 'source'"),
        ({"force": True}, "needs a source"),
        ({"source": "/not/merged"}, "is not one of the merged models"),
    ],
)
def test_bad_token_settings_are_one_line_errors(vocab_models, tmp_path, entry, needle):
    m = vocab_models
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(m["tool_a"])}, {"model": str(m["tool_b"])}],
        "parameters": {"weight": 1.0},
        "tokenizer": {"source": "union", "tokens": {"<tool>": entry}},
    }
    with pytest.raises(UserError, match=needle) as e:
        moekit.merge(cfg, tmp_path / "out")
    assert "\n" not in str(e.value) and "tokenizer.tokens.<tool>" in str(e.value)
    assert not (tmp_path / "out").exists()
