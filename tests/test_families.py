"""Every family of the test matrix: layout inferred (or tabled), dense merges checked tensor by tensor against the
formula, loaded and run in transformers.

Per family, two tiny random models A and B (independent seeds) with a locally trained tokenizer:
- a linear merge with a per-layer gradient on A's weight: every output tensor == (w_A(t) A + w_B B) / (w_A(t) + w_B)
  read back with the safetensors library, t = layer / (layers - 1) (0 outside the layers), |err| <= 1e-6 (fp32);
  the merged model loads in transformers and its logits equal those of a model given the formula's tensors
  (<= 1e-5), and it generates;
- a frankenmerge (passthrough slices A[0:2] + B[1:3]) that renumbers layers: output layer i is exactly the source
  layer, the config has 4 layers, and it loads and generates;
- a tokenizer merge (tokenizer_source: union) where B has one more token: the vocabulary-indexed tensors (found
  here as the non-layer tensors with one row per token) grow by one row that is B's row, the others are the
  weighted mean, and the model loads with the new vocabulary.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_tensors
from family_models import DENSE_MATRIX, make_family_model
from safetensors.torch import load_file, save_file

import moekit

TOL = 1e-6  # |moekit - formula| per element, fp32
LOGIT_TOL = 1e-5  # transformers logits of the merge vs of the formula's tensors
VOCAB = 256
TIED = {"gemma", "gemma2", "gpt2", "gpt_bigcode", "starcoder2", "cohere", "falcon"}  # the rest untied
LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


@pytest.fixture(scope="module", autouse=True)
def layout_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(tmp_path_factory.mktemp("moekit_cache")))
        yield


def _models(root: Path, model_type: str) -> tuple[Path, Path]:
    tie = model_type in TIED
    a = make_family_model(root / "a", model_type, seed=1, tie_word_embeddings=tie)
    b = make_family_model(root / "b", model_type, seed=2, tie_word_embeddings=tie)
    return a, b


def _layer(name: str) -> int | None:
    m = LAYER.match(name)
    return int(m.group(2)) if m and m.group(1).count(".") <= 1 else None


def _logits(model_dir_or_model, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = model_dir_or_model
    if isinstance(model, Path):
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits


def _generates(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = tok("def merge(models, weights):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert out.shape[1] == ids.shape[1] + 4
    assert isinstance(tok.decode(out[0]), str)


@pytest.mark.parametrize("model_type", DENSE_MATRIX)
def test_dense_merges(model_type, tmp_path):
    a, b = _models(tmp_path, model_type)
    ta, tb = load_tensors(a), load_tensors(b)
    num_layers = 3

    # Linear merge, A's weight a gradient over the layers.
    grad, wb = [0.2, 0.8], 0.5
    out = moekit.merge(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(a), "parameters": {"weight": grad}},
                {"model": str(b), "parameters": {"weight": wb}},
            ],
            "dtype": "float32",
        },
        tmp_path / "linear",
    )
    merged = load_tensors(out)
    assert set(merged) == set(ta)
    expected = {}
    for name, x in ta.items():
        layer = _layer(name)
        t = 0.0 if layer is None else layer / (num_layers - 1)
        wa = grad[0] + (grad[1] - grad[0]) * t
        expected[name] = (wa * x + wb * tb[name]) / (wa + wb)
        torch.testing.assert_close(merged[name], expected[name], atol=TOL, rtol=0, msg=name)

    # The formula's tensors, saved next to A's config, are the reference transformers runs.
    reference = tmp_path / "formula"
    shutil.copytree(a, reference)
    save_file(expected, str(reference / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(out, ids), _logits(reference, ids), atol=LOGIT_TOL, rtol=0)
    _generates(out)

    # Frankenmerge: A's layers 0-1, then B's layers 1-2, renumbered 0..3.
    frank = moekit.merge(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(b), "layer_range": [1, 3]}]},
            ],
            "dtype": "float32",
        },
        tmp_path / "frank",
    )
    fm = load_tensors(frank)
    sources = [(ta, 0), (ta, 1), (tb, 1), (tb, 2)]
    for name, x in fm.items():
        m = LAYER.match(name)
        layer = _layer(name)
        if layer is None:
            src = ta if _is_pre(name) else tb
            assert torch.equal(x, src[name]), name
            continue
        tensors, src_layer = sources[layer]
        assert torch.equal(x, tensors[f"{m.group(1)}.{src_layer}.{m.group(3)}"]), name
    assert len({_layer(n) for n in fm} - {None}) == 4
    cfg = json.loads((frank / "config.json").read_text())
    assert cfg.get("num_hidden_layers", cfg.get("n_layer", cfg.get("n_layers"))) == 4
    _generates(frank)

    # Tokenizer merge: B knows one more token.
    b2 = _add_token(b, tmp_path / "b2", "<extra>", seed=4)
    tok_out = moekit.merge(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(a), "parameters": {"weight": 0.25}},
                {"model": str(b2), "parameters": {"weight": 0.75}},
            ],
            "tokenizer_source": "union",
            "dtype": "float32",
        },
        tmp_path / "tok",
    )
    tm, tb2 = load_tensors(tok_out), load_tensors(b2)
    grown = _vocab_tensors(ta, VOCAB)
    assert grown, "no vocabulary-indexed tensor found"
    rows_a, rows_b = _token_rows(a, VOCAB), _token_rows(b2, tb2[grown[0]].shape[0])
    out_vocab = _token_rows(tok_out, None)
    assert "<extra>" in out_vocab
    for name in grown:
        assert tm[name].shape[0] >= len(out_vocab), name
        for token, j in out_vocab.items():
            ia, ib = rows_a.get(token), rows_b.get(token)
            if ia is None and ib is None:
                continue
            # A token only one model has: that model's row stands in for the other (mergekit's donor rule).
            xa = ta[name][ia] if ia is not None else tb2[name][ib]
            xb = tb2[name][ib] if ib is not None else ta[name][ia]
            torch.testing.assert_close(
                tm[name][j], 0.25 * xa + 0.75 * xb, atol=TOL, rtol=0, msg=(name, token)
            )
    _generates(tok_out)


def _is_pre(name: str) -> bool:
    return any(k in name for k in ("embed", "wte", "wpe", "word_embeddings"))


def _vocab_tensors(tensors: dict, rows: int) -> list[str]:
    """Non-layer tensors with one row per token: the embeddings, the head and its bias."""
    return [n for n, t in tensors.items() if _layer(n) is None and t.dim() >= 1 and t.shape[0] == rows]


def _token_rows(model_dir: Path, rows: int | None) -> dict[str, int]:
    """token -> row for the tokens that have a row (id < rows) in the model's tokenizer."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(model_dir)).get_vocab()
    return {t: i for t, i in vocab.items() if rows is None or i < rows}


def _add_token(src: Path, out: Path, token: str, seed: int) -> Path:
    from transformers import AutoTokenizer

    shutil.copytree(src, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.add_tokens([token])
    tok.save_pretrained(str(out))
    rows = max(tok.get_vocab().values()) + 1
    g = torch.Generator().manual_seed(seed)
    for f in out.glob("*.safetensors"):
        tensors = load_file(str(f))
        for name in _vocab_tensors(tensors, VOCAB):
            t = tensors[name]
            extra = torch.randn((rows - VOCAB, *t.shape[1:]), generator=g) * 0.1
            tensors[name] = torch.cat([t, extra]).contiguous()
        save_file(tensors, str(f), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] = rows
    (out / "config.json").write_text(json.dumps(cfg))
    return out
