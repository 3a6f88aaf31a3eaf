"""route-stats on tiny MoE models whose routers are set by hand.

Every number `route_stats` reports is checked against an independent computation: the test runs the model
itself, one window at a time and without padding, with `output_router_logits=True`, and derives each metric
from those logits with plain numpy (float64). Some layers are pinned so their routing is known outright.

Tolerances: counts are compared exactly; probabilities, entropies and their derived metrics to 1e-5 (the
library sums fp32 softmax values in float64, the reference computes the softmax in float64; batching with
padding also changes the fp32 logits in the last bits).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moekit.cli import main
from moekit.errors import UserError
from moekit.stats import RouteStats, route_stats, specialisation_report
from moekit.stats.report import plot, print_report

CODE_WORDS = "def return import class self for in if else print lambda yield".split()
LEGAL_WORDS = "licence copyright warranty liability grant permission notice software holder damages".split()
SHARED_WORDS = "the a of and to".split()
PINNED_DIM, LABEL_DIM = 0, 1  # residual dimensions that stay constant through every layer (see _pin_residual)
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: on a shared 2-core box torch's thread pool costs more than the math
    (measured: torch._grouped_mm on 20x16 rows takes ~38 ms with 2 busy threads, 0.03 ms with one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tokenizer(adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """Word-level; like Qwen2's it adds no special tokens, or, with `adds_bos`, BOS as Llama's does."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "<s>", *CODE_WORDS, *LEGAL_WORDS, *SHARED_WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", unk_token="[UNK]", pad_token="[PAD]"
    )


def _random_prompts(rng: np.random.Generator, words: list[str], count: int) -> list[str]:
    return [" ".join(rng.choice(words + SHARED_WORDS, size=int(rng.integers(3, 12)))) for _ in range(count)]


def _pin_residual(model, tokenizer) -> None:
    """Make residual dims PINNED_DIM and LABEL_DIM constant through the network.

    Every weight that writes into the residual stream (attention o_proj, routed and shared experts' down
    projections) gets those output rows zeroed, so the dims keep their embedding values in every layer.
    PINNED_DIM is 4 for every token; LABEL_DIM is +4 for code words, -4 for licence words, 0 otherwise.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("shared_expert.down_proj.weight"):
                param[[PINNED_DIM, LABEL_DIM], :] = 0
            elif name.endswith("experts.down_proj"):  # [E, H, I]
                param[:, [PINNED_DIM, LABEL_DIM], :] = 0
        embed = model.get_input_embeddings().weight
        embed[:, PINNED_DIM] = 4.0
        embed[:, LABEL_DIM] = 0.0
        for word in CODE_WORDS:
            embed[tokenizer.convert_tokens_to_ids(word), LABEL_DIM] = 4.0
        for word in LEGAL_WORDS:
            embed[tokenizer.convert_tokens_to_ids(word), LABEL_DIM] = -4.0


def _set_gate(model, layer: int, pinned: list[float], label: list[float], generator, scale=0.05) -> None:
    """Router of `layer`: given columns on the pinned and label dims, N(0, scale²) weights elsewhere."""
    gate = model.model.layers[layer].mlp.gate.weight
    with torch.no_grad():
        gate.copy_(scale * torch.randn(gate.shape, generator=generator))
        gate[:, PINNED_DIM] = torch.tensor(pinned)
        gate[:, LABEL_DIM] = torch.tensor(label)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    """Mixtral, 4 layers, E=4, k=2. Layer 0 always picks {2, 3} (top-1 2): experts 0 and 1 are dead.
    Layer 1 is random. Layer 2 follows the label: code -> expert 0 first, licence -> expert 1 first.
    Layer 3 always picks expert 0 first and never expert 3."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    tokenizer = _tokenizer()
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id, pad_token_id=0,
    )  # fmt: skip
    model = MixtralForCausalLM(config).eval()
    _pin_residual(model, tokenizer)
    _set_gate(model, 0, pinned=[-3.0, -1.0, 2.0, 1.0], label=[0, 0, 0, 0], generator=generator)
    _set_gate(model, 1, pinned=[0] * 4, label=[0] * 4, generator=generator, scale=2.0)
    _set_gate(model, 2, pinned=[0, 0, 0, 0], label=[3.0, -3.0, 0, 0], generator=generator)
    _set_gate(model, 3, pinned=[3.0, 0.5, 0.0, -3.0], label=[0, 0, 0, 0], generator=generator)
    out = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """Qwen2-MoE, 3 layers with layer 1 dense (mlp_only_layers), E=6, k=2, a shared expert, random routers
    except that layer 2 never picks expert 5."""
    torch.manual_seed(2)
    generator = torch.Generator().manual_seed(3)
    tokenizer = _tokenizer(adds_bos=True)  # the Mixtral fixture's adds none: the reference tests see both
    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
        shared_expert_intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1], max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=0,
    )  # fmt: skip
    model = Qwen2MoeForCausalLM(config).eval()
    _pin_residual(model, tokenizer)
    _set_gate(model, 0, pinned=[0] * 6, label=[0] * 6, generator=generator, scale=2.0)
    # layer 2: random over the other dims (experts 0-4 share the load), expert 5 pushed far down
    _set_gate(model, 2, pinned=[0, 0, 0, 0, 0, -4.0], label=[0] * 6, generator=generator, scale=2.0)
    out = tmp_path_factory.mktemp("qwen2moe")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def labelled_prompts():
    rng = np.random.default_rng(4)
    return {"code": _random_prompts(rng, CODE_WORDS, 7), "legal": _random_prompts(rng, LEGAL_WORDS, 5)}


# ---- the independent reference ------------------------------------------------------------------------------
def _reference_logits(model_dir, prompts: list[str]) -> list[np.ndarray]:
    """[tokens, E] float64 router logits per MoE layer, each prompt run alone as its tokenizer encodes it (with
    the special tokens it adds, if any), without padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    per_layer: list[list[np.ndarray]] = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt)["input_ids"]
            out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
            if not per_layer:
                per_layer = [[] for _ in out.router_logits]
            for layer, logits in enumerate(out.router_logits):
                per_layer[layer].append(logits.double().numpy())
    return [np.concatenate(chunks) for chunks in per_layer]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _topk(probs: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-probs, axis=1, kind="stable")[:, :k]


def _check_against_reference(stats: RouteStats, logits: list[np.ndarray], k: int) -> None:
    num_experts = logits[0].shape[1]
    tokens = logits[0].shape[0]
    assert stats.tokens == tokens
    selections = []
    for layer, layer_logits in enumerate(logits):
        probs = _softmax(layer_logits)
        top = _topk(probs, k)
        selections.append(top)
        chosen = np.zeros_like(probs)
        for t in range(tokens):  # deliberately a loop: one token at a time
            chosen[t, top[t]] = 1
        counts = chosen.sum(axis=0)
        np.testing.assert_array_equal(stats.counts[layer], counts)
        assert stats.counts[layer].sum() == k * tokens
        np.testing.assert_array_equal(stats.top1_counts[layer], np.bincount(top[:, 0], minlength=num_experts))
        share = counts / (k * tokens)
        np.testing.assert_allclose(stats.fractions[layer], share, atol=1e-12)
        assert stats.max_over_mean[layer] == pytest.approx(
            counts.max() / (k * tokens / num_experts), abs=1e-12
        )
        mean = counts.mean()
        cv = math.sqrt(sum((c - mean) ** 2 for c in counts) / num_experts) / mean
        assert stats.cv[layer] == pytest.approx(cv, abs=1e-12)
        mean_prob = probs.mean(axis=0)
        assert stats.switch_aux[layer] == pytest.approx(num_experts * float(share @ mean_prob), abs=TOL)
        # transformers' Mixtral loss on this one layer is k times ours (its f sums to k, ours to 1)
        hf_aux = load_balancing_loss_func((torch.from_numpy(layer_logits),), num_experts, k)
        assert float(hf_aux) == pytest.approx(k * stats.switch_aux[layer], abs=TOL)
        entropy = -np.mean([sum(p * math.log2(p) for p in row if p > 0) for row in probs])
        assert stats.entropy_bits[layer] == pytest.approx(entropy, abs=TOL)
        assert stats.top1_prob[layer] == pytest.approx(probs.max(axis=1).mean(), abs=TOL)
        np.testing.assert_array_equal(stats.dead[layer], counts < 0.01 * (k * tokens) / num_experts)
        cosel = np.zeros((num_experts, num_experts))
        for t in range(tokens):
            for a in top[t]:
                for b in top[t]:
                    cosel[a, b] += 1
        np.testing.assert_array_equal(stats.coselection[layer], cosel)
    for i in range(len(logits) - 1):
        a, b = selections[i], selections[i + 1]
        assert stats.top1_agreement[i] == pytest.approx(np.mean(a[:, 0] == b[:, 0]), abs=1e-12)
        shared = np.mean([len(set(x) & set(y)) for x, y in zip(a, b)]) / k
        assert stats.topk_overlap[i] == pytest.approx(shared, abs=1e-12)
        p, q = (np.bincount(s[:, 0], minlength=num_experts) / tokens for s in (a, b))
        assert stats.top1_chance[i] == pytest.approx(float(p @ q), abs=1e-12)


def _mutual_information(table: np.ndarray) -> tuple[float, float]:
    """I(Y;E) = H(Y) + H(E) - H(Y,E), and I / min(H(Y), H(E)): a different route from the library's."""

    def h(p):
        p = p[p > 0] / p.sum()
        return float(-(p * np.log2(p)).sum())

    hy, he, hye = h(table.sum(axis=1)), h(table.sum(axis=0)), h(table.ravel())
    mi = hy + he - hye
    return mi, mi / min(hy, he)


# ---- tests ---------------------------------------------------------------------------------------------
def test_mixtral_counts_and_metrics_match_reference(mixtral_dir, labelled_prompts):
    prompts = labelled_prompts["code"] + labelled_prompts["legal"]
    # batch_size 3 mixes lengths, so rows are padded and the padding must be left out
    stats = route_stats(mixtral_dir, prompts, batch_size=3)
    logits = _reference_logits(mixtral_dir, prompts)
    _check_against_reference(stats, logits, k=2)
    assert stats.layers == [0, 1, 2, 3]
    tokens = stats.tokens
    # the pinned layers, known without looking at any logits
    np.testing.assert_array_equal(stats.counts[0], [0, 0, tokens, tokens])
    np.testing.assert_array_equal(stats.top1_counts[0], [0, 0, tokens, 0])
    np.testing.assert_array_equal(stats.dead[0], [True, True, False, False])
    assert stats.counts[3][0] == tokens and stats.counts[3][3] == 0
    np.testing.assert_array_equal(stats.coselection[0][2:, 2:], [[tokens, tokens], [tokens, tokens]])
    assert 0 < stats.counts[1].min()  # the random layer spreads the load


def test_hooks_and_output_router_logits_agree(mixtral_dir, labelled_prompts):
    a = route_stats(mixtral_dir, labelled_prompts, batch_size=4, method="output_router_logits")
    b = route_stats(mixtral_dir, labelled_prompts, batch_size=5, method="hooks")
    for name in ("counts", "top1_counts", "coselection", "adjacent_top1_agree", "adjacent_topk_shared"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_allclose(a.prob_sums, b.prob_sums, rtol=TOL)
    for label in ("code", "legal"):
        np.testing.assert_array_equal(a.label_counts[label], b.label_counts[label])


def test_labels_specialisation_matches_independent_formula(mixtral_dir, labelled_prompts):
    stats = route_stats(mixtral_dir, labelled_prompts, batch_size=4)
    per_label = {y: _reference_logits(mixtral_dir, p) for y, p in labelled_prompts.items()}
    for label, logits in per_label.items():
        assert stats.label_tokens[label] == logits[0].shape[0]
        for layer, layer_logits in enumerate(logits):
            top = _topk(_softmax(layer_logits), 2)
            counts = np.bincount(top.ravel(), minlength=4)
            np.testing.assert_array_equal(stats.label_counts[label][layer], counts)
    spec = specialisation_report(stats)
    for layer in range(4):
        table = np.stack([stats.label_counts[y][layer] for y in ("code", "legal")]).astype(float)
        mi, nmi = _mutual_information(table)
        assert spec.mi_bits[layer] == pytest.approx(mi, abs=1e-9)
        assert spec.mi_normalised[layer] == pytest.approx(nmi, abs=1e-9)
    assert spec.mi_bits[0] == pytest.approx(0.0, abs=1e-12)  # layer 0 ignores the label
    # layer 2 follows the label dim: every code word goes to expert 0 and every licence word to expert 1 (BOS
    # and shared words carry no label and go anywhere), so it is the layer with the most label information
    words = {y: [w for line in lines for w in line.split()] for y, lines in labelled_prompts.items()}
    assert stats.label_counts["code"][2][0] >= sum(w in CODE_WORDS for w in words["code"]) > 0
    assert stats.label_counts["legal"][2][1] >= sum(w in LEGAL_WORDS for w in words["legal"]) > 0
    assert int(np.argmax(spec.mi_bits)) == 2
    assert spec.top_expert_per_layer["code"][2] == 0 and spec.top_expert_per_layer["legal"][2] == 1
    pooled = {y: stats.label_counts[y].sum(axis=0) for y in ("code", "legal")}
    for y in pooled:
        np.testing.assert_allclose(spec.distribution[y], pooled[y] / pooled[y].sum(), atol=1e-12)
        assert spec.top_expert[y] == int(np.argmax(pooled[y]))


def test_qwen2_moe_skips_dense_layers_and_matches_reference(qwen_dir, labelled_prompts):
    prompts = labelled_prompts["legal"] + labelled_prompts["code"][:3]
    stats = route_stats(qwen_dir, prompts, batch_size=2, method="hooks")
    assert stats.layers == [0, 2] and stats.num_experts == 6
    _check_against_reference(stats, _reference_logits(qwen_dir, prompts), k=2)
    assert stats.counts[1][5] == 0 and stats.dead[1][5]
    assert stats.counts[0].min() > 0 and stats.counts[1][:5].min() > 0


def test_windows_follow_the_tokenizers_special_tokens_and_max_tokens(mixtral_dir, tmp_path):
    words = (CODE_WORDS + SHARED_WORDS) * 3
    text = tmp_path / "code.txt"
    text.write_text(" ".join(words[:20]) + "\n\n" + " ".join(words[20:45]) + "\n")  # paragraphs: one document
    # the fixture's tokenizer adds no special tokens: the windows are its ids, with no BOS of route-stats' own
    plain = route_stats(mixtral_dir, str(text), window=8)
    assert plain.tokens == 45 and plain.sources[0]["windows"] == math.ceil(45 / 8)
    # a tokenizer that adds BOS: every window is led by it (7 words + BOS per window)
    with_bos = route_stats(mixtral_dir, str(text), window=8, tokenizer=_tokenizer(adds_bos=True))
    assert with_bos.tokens == 45 + math.ceil(45 / 7)
    bos = _tokenizer().bos_token_id
    from moekit.stats.prompts import token_windows

    windows = token_windows([text.read_text()], _tokenizer(adds_bos=True), 8, None)
    assert (
        all(w[0] == bos and bos not in w[1:] for w in windows) and sum(map(len, windows)) == with_bos.tokens
    )
    assert all(bos not in w for w in token_windows([text.read_text()], _tokenizer(), 8, None))
    capped = route_stats(mixtral_dir, str(text), window=8, max_tokens=20)
    assert capped.tokens == 20
    assert capped.counts.sum(axis=1).tolist() == [40] * 4


def test_outputs_json_csv_plot_and_table(mixtral_dir, labelled_prompts, tmp_path):
    stats = route_stats(mixtral_dir, labelled_prompts, batch_size=4)
    data = json.loads(stats.to_json(tmp_path / "s.json"))
    assert data["tokens"] == stats.tokens and data["model"]["moe_layers"] == [0, 1, 2, 3]
    assert data["layers"][2]["labels"]["code"]["counts"] == stats.label_counts["code"][2].tolist()
    assert data["overall"]["switch_aux"] == pytest.approx(float(stats.switch_aux.mean()))
    assert data["specialisation"]["top_expert"] == specialisation_report(stats).top_expert
    assert {s["label"] for s in data["prompts"]} == {"code", "legal"}
    rows = stats.to_csv().splitlines()
    assert len(rows) == 1 + 4 * 4 and rows[0].startswith("layer,expert,count,fraction")
    first = rows[1 + 2 * 4].split(",")  # layer 2, expert 0
    assert int(first[2]) == stats.counts[2][0] and int(first[7]) == stats.label_counts["code"][2][0]
    png = plot(stats, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from rich.console import Console

    console = Console(record=True, width=200)
    print_report(stats, console)
    text = console.export_text()
    assert "specialisation" in text and "all" in text


# ---- the command line ---------------------------------------------------------------------------------------
def _run_cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_cli_end_to_end(mixtral_dir, labelled_prompts, tmp_path, capsys):
    files = []
    for label, prompts in labelled_prompts.items():
        path = tmp_path / f"{label}.txt"
        path.write_text("\n".join(prompts) + "\n")
        files += ["--prompts", f"{label}={path}"]
    out = tmp_path / "out"
    code, stdout, err = _run_cli(
        ["route-stats", str(mixtral_dir), *files, "--batch-size", "4", "--json", f"{out}.json",
         "--csv", f"{out}.csv", "--plot", f"{out}.png"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "specialisation" in stdout
    assert "Loading weights" not in err  # with stderr not a terminal, no bars: ours or transformers'
    api = route_stats(mixtral_dir, labelled_prompts, batch_size=4)
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["layers"][1]["counts"] == api.counts[1].tolist()
    assert data["specialisation"]["mutual_information_bits"] == pytest.approx(
        specialisation_report(api).mean_mi_bits, abs=1e-12
    )
    assert (tmp_path / "out.csv").read_text() == api.to_csv()
    assert (tmp_path / "out.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("dense")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_cli_bad_inputs_exit_2_with_one_line(mixtral_dir, dense_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("def return self\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = {
        "dense": ([str(dense_dir), "--prompts", str(prompts)], "dense model"),
        "empty": ([str(mixtral_dir), "--prompts", str(empty)], "is empty"),
        "missing model": ([str(tmp_path / "nope"), "--prompts", str(prompts)], "not found"),
        "missing prompts": ([str(mixtral_dir), "--prompts", str(tmp_path / "nope.txt")], "not found"),
        "mixed labels": ([str(mixtral_dir), "--prompts", f"a={prompts}", "--prompts", str(prompts)], "label"),
    }
    for case, (argv, expected) in cases.items():
        code, stdout, err = _run_cli(["route-stats", *argv], capsys)
        assert code == 2, case
        assert len(err.strip().splitlines()) == 1 and expected in err, (case, err)


# ---- pure pieces ---------------------------------------------------------------------------------------------
def test_mutual_information_on_known_tables():
    from moekit.stats.metrics import mutual_information_bits

    rng = np.random.default_rng(5)
    diagonal = np.diag(rng.integers(5, 50, size=4)).astype(float)  # the label fixes the expert
    mi, nmi = mutual_information_bits(diagonal)
    p = diagonal.sum(axis=1) / diagonal.sum()
    assert mi == pytest.approx(-(p * np.log2(p)).sum(), abs=1e-12) and nmi == pytest.approx(1.0, abs=1e-12)
    independent = np.outer(rng.integers(1, 9, size=3), rng.integers(1, 9, size=5)).astype(float)
    assert mutual_information_bits(independent)[0] == pytest.approx(0.0, abs=1e-12)
    table = rng.integers(0, 30, size=(3, 6)).astype(float)
    assert mutual_information_bits(table) == pytest.approx(_mutual_information(table), abs=1e-12)


def test_prompt_file_rule_and_label_option(tmp_path):
    from moekit.stats.prompts import parse_prompts_option, read_prompts_file

    lines = tmp_path / "lines.txt"
    lines.write_text("first prompt\nsecond one\n  \n")
    assert read_prompts_file(lines) == ("first prompt", "second one")
    prose = tmp_path / "prose.txt"
    prose.write_text("para one\nstill one\n\npara two\n")
    assert read_prompts_file(prose) == ("para one\nstill one\n\npara two\n",)
    assert parse_prompts_option(f"code={lines}") == ("code", lines)
    odd = tmp_path / "a=b.txt"
    odd.write_text("x\n")
    assert parse_prompts_option(str(odd)) == (None, odd)


def test_loaded_model_object_and_tokenizer(mixtral_dir, labelled_prompts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(mixtral_dir)
    from_object = route_stats(model, labelled_prompts["code"], tokenizer=tokenizer)
    from_path = route_stats(mixtral_dir, labelled_prompts["code"])
    np.testing.assert_array_equal(from_object.counts, from_path.counts)
    assert from_object.tokens == from_path.tokens


def test_qwen3_moe_matches_reference(tmp_path, labelled_prompts):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(6)
    tokenizer = _tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=5,
        num_experts_per_tok=3, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 2.0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = labelled_prompts["code"]
    stats = route_stats(tmp_path, prompts, batch_size=3)
    assert stats.layers == [0, 1] and stats.top_k == 3
    _check_against_reference(stats, _reference_logits(tmp_path, prompts), k=3)


# ---- hostile inputs: outputs, model files, options (the table in tests/README.md) ------------------------------
# Each case: (id, the bad input, setup, text the one-line error must hold). setup(case_dir, model_dir, monkeypatch)
# prepares the case and returns the route-stats arguments; `{prompts}` in them is a valid prompts file.
README = Path(__file__).parent / "README.md"
TABLE_START, TABLE_END = "<!-- route-stats-table:start -->", "<!-- route-stats-table:end -->"


def _copy_model(model_dir: Path, case_dir: Path) -> Path:
    return Path(shutil.copytree(model_dir, case_dir / "model"))


def _edit_config(**changes):
    def setup(case_dir, model_dir, monkeypatch):
        model = _copy_model(model_dir, case_dir)
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(config | changes))
        return [str(model)]

    return setup


def _edit_tensors(edit):
    def setup(case_dir, model_dir, monkeypatch):
        model = _copy_model(model_dir, case_dir)
        tensors = load_file(model / "model.safetensors")
        edit(tensors)
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
        return [str(model)]

    return setup


def _truncated(case_dir, model_dir, monkeypatch):
    model = _copy_model(model_dir, case_dir)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return [str(model)]


class _Payload:
    """Unpickling this creates a file: a stand-in for the code a hostile pickle would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_pickle(*options):
    def setup(case_dir, model_dir, monkeypatch):
        model = _copy_model(model_dir, case_dir)
        tensors = load_file(model / "model.safetensors")
        torch.save(tensors | {"lm_head.weight": _Payload(case_dir / "PWNED")}, model / "pytorch_model.bin")
        (model / "model.safetensors").unlink()
        return [str(model), *options]

    return setup


def _existing_output(case_dir, model_dir, monkeypatch):
    (case_dir / "stats.json").write_text("keep me\n")
    return [str(model_dir), "--json", str(case_dir / "stats.json")]


def _symlink_into_model(case_dir, model_dir, monkeypatch):
    (case_dir / "stats.json").symlink_to(model_dir / "config.json")
    return [str(model_dir), "--json", str(case_dir / "stats.json"), "--force"]


def _failing_open(error: int, after_bytes: int | None = None):
    """moekit.stats.outputs' `open`, replaced: fails with `error` at once or after writing `after_bytes` bytes."""
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        if after_bytes is None:
            raise OSError(error, os.strerror(error))
        f = real_open(path, mode, *args, **kwargs)
        real_write = f.write

        def write(data):
            real_write(data[:after_bytes])
            raise OSError(error, os.strerror(error))

        f.write = write
        return f

    return fake_open


def _write_fails(error: int, after_bytes: int | None = None):
    def setup(case_dir, model_dir, monkeypatch):
        import moekit.stats.outputs

        (case_dir / "stats.json").write_text("keep me\n")
        monkeypatch.setattr(moekit.stats.outputs, "open", _failing_open(error, after_bytes), raising=False)
        outputs = ["--csv", str(case_dir / "stats.csv"), "--json", str(case_dir / "stats.json"), "--force"]
        return [str(model_dir), *outputs]

    return setup


def _args(*extra):
    return lambda case_dir, model_dir, monkeypatch: [str(model_dir), *(a.format(dir=case_dir) for a in extra)]


def _nan_router(tensors):
    tensors["model.layers.2.block_sparse_moe.gate.weight"][1, 3] = float("nan")


ROUTE_STATS_CASES = [
    ("output-exists", "--json names an existing file, without --force", _existing_output, "--force"),
    ("output-in-model", "--csv MODEL/model.safetensors (with --force)",
     lambda d, m, mp: [str(m), "--csv", str(m / "model.safetensors"), "--force"], "inside the model directory"),
    ("output-new-in-model", "--json MODEL/stats.json, a new file in the model directory",
     lambda d, m, mp: [str(m), "--json", str(m / "stats.json")], "inside the model directory"),
    ("output-symlink-into-model", "--json LINK --force, LINK pointing at MODEL/config.json", _symlink_into_model,
     "inside the model directory"),
    ("output-device", "--json /dev/full (with --force)", _args("--json", "/dev/full", "--force"), "not a regular"),
    ("output-missing-dir", "--json in a directory that does not exist", _args("--json", "{dir}/no/stats.json"),
     "does not exist"),
    ("output-twice", "--json and --csv naming the same file", _args("--json", "{dir}/s", "--csv", "{dir}/s"),
     "both write"),
    ("plot-suffix", "--plot with an unknown image suffix", _args("--plot", "{dir}/load.xyz"), "image format"),
    ("output-read-only", "the output directory is read-only", _write_fails(errno.EROFS), "Read-only"),
    ("output-disk-full", "the disk fills up while the outputs are written (old --json kept, no --csv)",
     _write_fails(errno.ENOSPC, after_bytes=100), "the disk is full"),
    ("pickle-refused", "only pytorch_model.bin (hostile), without --allow-pickle", _hostile_pickle(), "only pickled weights"),
    ("pickle-hostile", "with --allow-pickle: a pickle that would run code", _hostile_pickle("--allow-pickle"), "weights_only"),
    ("weights-truncated", "model.safetensors cut in half", _truncated, "truncated"),
    ("experts-mismatch", "config.json says 8 experts, the weights hold 4", _edit_config(num_local_experts=8),
     "does not match its config"),
    ("router-missing", "a router tensor missing from the weights",
     _edit_tensors(lambda t: t.pop("model.layers.1.block_sparse_moe.gate.weight")), "random values"),
    ("top-k-too-large", "num_experts_per_tok larger than the expert count", _edit_config(num_experts_per_tok=6),
     "only 4 experts"),
    ("window-past-positions", "--window past max_position_embeddings", _args("--window", "4096"),
     "past the model's 128 positions"),
    ("nan-router", "a router weight that is NaN", _edit_tensors(_nan_router), "NaN"),
]  # fmt: skip


def _table_row(case_id: str, what: str, message: str) -> str:
    return f"| `{case_id}` | {what} | `` {message.replace('|', chr(92) + '|')} `` |"


def test_hostile_route_stats_inputs_one_line_exit_2(mixtral_dir, tmp_path, capsys, monkeypatch):
    """Every case: exit 2, one line naming the problem, and no file written or changed; the README's table is
    these lines (regenerate: MOEKIT_UPDATE_README=1 pytest tests/test_stats.py -k hostile)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def return self\nthe licence grant\n")
    weights = (mixtral_dir / "model.safetensors").read_bytes()
    rows = []
    for case_id, what, setup, expected in ROUTE_STATS_CASES:
        case_dir = tmp_path / case_id
        case_dir.mkdir()
        with monkeypatch.context() as patch:
            argv = setup(case_dir, mixtral_dir, patch)
            code, _, err = _run_cli(["route-stats", *argv, "--prompts", str(prompts)], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in err, (case_id, code, err)
        shown = lines[0].replace(str(case_dir), ".").replace(str(mixtral_dir), "models/mixtral")
        rows.append(_table_row(case_id, what, shown))
        assert not (case_dir / "PWNED").exists(), case_id  # the hostile pickle's payload never ran
        kept = case_dir / "stats.json"
        if kept.exists() and not kept.is_symlink():
            assert kept.read_text() == "keep me\n", case_id
        left = sorted(p.name for p in case_dir.iterdir())
        assert not any("moekit-tmp" in name or name in ("stats.csv", "s", "load.xyz") for name in left), left
    assert (mixtral_dir / "model.safetensors").read_bytes() == weights
    assert not (mixtral_dir / "stats.json").exists()
    table = "\n".join(["| case | bad input | what the user sees (stderr; exit 2) |", "|---|---|---|", *rows])
    text = README.read_text()
    before, rest = text.split(TABLE_START)
    _, after = rest.split(TABLE_END)
    fresh = f"{before}{TABLE_START}\n{table}\n{TABLE_END}{after}"
    if os.environ.get("MOEKIT_UPDATE_README") == "1":
        README.write_text(fresh)
        text = fresh
    assert text == fresh, (
        "tests/README.md is out of date: MOEKIT_UPDATE_README=1 pytest tests/test_stats.py -k hostile"
    )


def test_force_replaces_outputs_and_api_writes_whole(
    mixtral_dir, labelled_prompts, tmp_path, capsys, monkeypatch
):
    import moekit.stats.outputs

    prompts = tmp_path / "code.txt"
    prompts.write_text("\n".join(labelled_prompts["code"]) + "\n")
    json_out, csv_out = tmp_path / "s.json", tmp_path / "s.csv"
    json_out.write_text("old\n")
    (tmp_path / "link.csv").symlink_to(csv_out)  # --force through a link replaces its target, not the link
    csv_out.write_text("old\n")
    argv = ["route-stats", str(mixtral_dir), "--prompts", str(prompts), "--json", str(json_out)]
    code, _, err = _run_cli([*argv, "--csv", str(tmp_path / "link.csv"), "--force", "-q"], capsys)
    assert code == 0, err
    api = route_stats(mixtral_dir, labelled_prompts["code"])
    assert json.loads(json_out.read_text())["layers"][2]["counts"] == api.counts[2].tolist()
    assert (tmp_path / "link.csv").is_symlink() and csv_out.read_text() == api.to_csv()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.txt", "link.csv", "s.csv", "s.json"]

    # the Python API replaces files too, but by rename: a write that fails half way leaves the old file
    monkeypatch.setattr(
        moekit.stats.outputs, "open", _failing_open(errno.ENOSPC, after_bytes=10), raising=False
    )
    with pytest.raises(UserError, match="disk is full"):
        api.to_json(json_out)
    with pytest.raises(UserError, match="disk is full"):
        plot(api, tmp_path / "new.png")
    assert json.loads(json_out.read_text())["layers"][2]["counts"] == api.counts[2].tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.txt", "link.csv", "s.csv", "s.json"]


def test_allow_pickle_loads_the_same_model(mixtral_dir, labelled_prompts, tmp_path, monkeypatch):
    pickled = Path(shutil.copytree(mixtral_dir, tmp_path / "pickled"))
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    loads = []
    real_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k)
    )
    with pytest.raises(UserError, match="--allow-pickle"):
        route_stats(pickled, labelled_prompts["code"])
    assert loads == []  # refused before anything was unpickled
    from_pickle = route_stats(pickled, labelled_prompts["code"], allow_pickle=True)
    assert loads and all(weights_only is True for weights_only in loads)
    reference = route_stats(mixtral_dir, labelled_prompts["code"])
    np.testing.assert_array_equal(from_pickle.counts, reference.counts)
    np.testing.assert_allclose(from_pickle.prob_sums, reference.prob_sums, rtol=1e-12)


# ---- prompts: linear file rule, chunked tokenizing --------------------------------------------------------------
def test_plain_text_rule_is_the_paragraph_regex():
    """The one-pass rule against the regex it replaces (quadratic, but exact), on random short texts."""
    import re

    from moekit.stats.prompts import is_plain_text

    regex = re.compile(r"\S[^\n]*\n[ \t\r]*\n\s*\S")
    rng = np.random.default_rng(7)
    alphabet = ["a", "b", " ", "\n", "\n", "\t", "\r", "\f", "\u00a0", "\u2028"]
    found = 0
    for _ in range(4000):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 14))))
        assert is_plain_text(text) == bool(regex.search(text)), repr(text)
        found += bool(regex.search(text))
    assert 50 < found < 3950  # both answers were exercised


class _CountingTokenizer:
    """A tokenizer that counts the characters it was asked to tokenize."""

    def __init__(self, inner):
        self.inner, self.chars = inner, 0

    def __call__(self, text, **kwargs):
        self.chars += len(text)
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.timeout(
    300, method="thread"
)  # the old paragraph regex takes hours on this line: a hang, not slowness
def test_a_megabyte_single_line_is_read_linearly_and_max_tokens_stops_early(mixtral_dir, tmp_path):
    rng = np.random.default_rng(8)
    line = " ".join(rng.choice(CODE_WORDS + SHARED_WORDS, size=200_000))  # about 1 MB, no line break
    path = tmp_path / "one-line.txt"
    path.write_text(line)
    tokenizer = _CountingTokenizer(_tokenizer())
    stats = route_stats(mixtral_dir, str(path), max_tokens=300, window=64, tokenizer=tokenizer)
    assert stats.tokens == 300 and stats.sources[0]["windows"] == math.ceil(300 / 64)
    from moekit.stats.prompts import CHUNK_CHARS

    assert (
        tokenizer.chars < 2 * CHUNK_CHARS < len(line) / 10
    )  # stopped after the first piece, not the megabyte
    expected = _tokenizer()(line[: 4 * 300 * 12])["input_ids"][:300]  # words are at most 8 chars + a space
    np.testing.assert_array_equal(stats.counts.sum(axis=1), [2 * 300] * 4)
    from moekit.stats.prompts import token_windows

    assert sum(token_windows([line], _tokenizer(), 64, 300), []) == expected


def _byte_level_bpe(corpus: list[str]) -> PreTrainedTokenizerFast:
    """GPT-2 / Qwen2 style: byte-level pre-tokenizer, a space belongs to the word after it."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _sentencepiece_bpe(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Llama-2 / Mistral style: no pre-tokenizer, and a normalizer that prepends '▁' to the whole text and turns
    spaces into '▁' (so a piece tokenized alone would gain a '▁'). Trained on words, as SentencePiece is."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    backend.pre_tokenizer = pre_tokenizers.Sequence([])
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_tokenizing_in_pieces_gives_the_whole_texts_tokens():
    from moekit.stats.prompts import text_ids

    rng = np.random.default_rng(9)
    vocabulary = CODE_WORDS + LEGAL_WORDS + SHARED_WORDS + ["(x)", "x=1;", "3.14", "don't"]
    separators = [" "] * 12 + ["  ", "\n", "\n\n", " \n", "\t", ", ", ". "]

    def text(n_words: int) -> str:
        parts = [str(rng.choice(vocabulary)) + str(rng.choice(separators)) for _ in range(n_words)]
        return "".join(parts)

    corpus = [text(40) for _ in range(100)]
    tokenizers = {"word-level": _tokenizer(), "byte-level": _byte_level_bpe(corpus)}
    tokenizers["sentencepiece"] = _sentencepiece_bpe(corpus)
    for name, tokenizer in tokenizers.items():
        for chunk_chars in (60, 97, 256):
            sample = text(300)
            whole = tokenizer(sample, add_special_tokens=False)["input_ids"]
            pieces = list(text_ids(sample, tokenizer, chunk_chars=chunk_chars))
            assert len(pieces) > len(sample) // chunk_chars  # it really was cut
            assert sum(pieces, []) == whole, (name, chunk_chars)


# ---- expert names and the terminal table ------------------------------------------------------------------------
def _with_recipe(mixtral_dir: Path, tmp_path: Path, recipe: dict) -> Path:
    import yaml

    model = Path(shutil.copytree(mixtral_dir, tmp_path / "moe"))
    (model / "moekit_config.yaml").write_text(yaml.safe_dump(recipe))
    return model


def test_experts_are_named_by_their_source_model(mixtral_dir, labelled_prompts, tmp_path):
    sources = [
        "models/code-llama-7b-instruct",
        "./models/legal/",
        "models/code-llama-7b-instruct",
        "/abs/chat",
    ]
    clown = {
        "base_model": "models/base",
        "experts": [{"source_model": s, "positive_prompts": ["x"]} for s in sources],
    }
    model = _with_recipe(mixtral_dir, tmp_path, clown)
    stats = route_stats(model, labelled_prompts)
    names = ["code-llama-7b-instruct#0", "legal", "code-llama-7b-instruct#1", "chat"]
    assert stats.expert_names == names
    assert json.loads(stats.to_json())["model"]["expert_names"] == names
    from rich.console import Console

    console = Console(record=True, width=200)
    print_report(stats, console)
    text = console.export_text()
    busiest = int(np.argmax(stats.counts[0]))
    assert f"{busiest}:{names[busiest]} {stats.fractions[0][busiest]:.0%}" in text
    from moekit.stats.experts import expert_names

    upcycled = _with_recipe(
        mixtral_dir, tmp_path / "up", {"base_model": "/m/base", "upcycle": {"num_experts": 4}}
    )
    assert expert_names(upcycled, 4) == ["base#0", "base#1", "base#2", "base#3"]
    assert expert_names(upcycled, 8) is None  # a recipe that does not match the model names nothing
    dense = _with_recipe(
        mixtral_dir, tmp_path / "dense", {"merge_method": "linear", "models": [{"model": "a"}]}
    )
    assert expert_names(dense, 4) is None
    assert route_stats(mixtral_dir, labelled_prompts["code"]).expert_names is None


def test_terminal_table_loses_nothing_at_any_width(mixtral_dir, labelled_prompts, tmp_path):
    from rich.console import Console

    from moekit.stats.report import _label_grid, _summary_grid

    sources = [f"models/a-rather-long-expert-name-{i}" for i in range(4)]
    recipe = {"base_model": "b", "experts": [{"source_model": s, "positive_prompts": [s]} for s in sources]}
    stats = route_stats(_with_recipe(mixtral_dir, tmp_path, recipe), labelled_prompts)
    cells = [cell for grid in (_summary_grid(stats), _label_grid(stats)) for row in grid[1] for cell in row]
    for width in (40, 60, 80, 100, 160):
        console = Console(record=True, width=width)
        print_report(stats, console)
        text = console.export_text()
        assert "…" not in text, width  # rich's ellipsis: a cell cut short
        assert max(map(len, text.splitlines())) <= width
        if width >= 60:  # wide enough that a cell wraps only between its words, never inside one
            words = {word for line in text.splitlines() for word in line.split()}
            missing = [w for cell in cells for w in cell.split() if w not in words]
            assert not missing, (width, missing)
