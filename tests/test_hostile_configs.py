"""Broken merge configs, dense and MoE: each one exits 2 with one line naming the file, key or tensor, before any
output exists, and leaves nothing on disk. The table here also feeds the summary table in tests/README.md.

Most cases run `moekit merge` in-process (moekit.cli.main) to keep the suite fast; a few run as real subprocesses.
"""

from __future__ import annotations

import shutil

import pytest
from helpers import assert_one_line_error, run_cli
from hostile_models import Case, assert_failed_cleanly, linear_config, micro_models, run_case, write_yaml

__all__ = ["CONFIG_CASES", "micro_models"]


def dense(method: str, models: list[tuple[str, dict]], base: str | None = None, **extra):
    """A `models:` config of micro models by name, with per-model parameters."""

    def build(m, d):
        cfg = {"merge_method": method}
        if base:
            cfg["base_model"] = str(m[base])
        cfg["models"] = [{"model": str(m[name]), "parameters": params} for name, params in models]
        return cfg | extra

    return build


def text(yaml_text: str):
    """YAML text; '{name}' expands to the path of micro model `name`."""
    return lambda m, d: yaml_text.format(**{k: str(v) for k, v in m.items()})


def sliced(*sources: tuple[str, list], method: str = "passthrough", **extra):
    return lambda m, d: (
        {
            "merge_method": method,
            "slices": [{"sources": [{"model": str(m[n]), "layer_range": lr} for n, lr in sources]}],
        }
        | extra
    )


def moe(experts: list[tuple[str, list[str] | None]], gate_mode: str = "hidden", base: str = "base", **extra):
    def build(m, d):
        cfg = {"base_model": str(m[base]) if base in m else base, "gate_mode": gate_mode}
        cfg["experts"] = [
            {"source_model": str(m[n])} | ({"positive_prompts": p} if p is not None else {})
            for n, p in experts
        ]
        return cfg | extra

    return build


W1 = {"weight": 1.0}
TWO = [("ft1", W1), ("ft2", W1)]
TA = dict(base="base")


def _output_holding_input(models, d) -> dict:
    """A directory that is an earlier moekit output (so --force may replace it) and also holds an input model."""
    (d / "moekit_config.yaml").write_text("{}\n")
    return linear_config(shutil.copytree(models["ft1"], d / "mine"), models["ft2"])


CONFIG_CASES: list[Case] = [
    # --- YAML syntax: the line and column of the problem ---
    Case(
        "yaml-bad-indent",
        "YAML: a key indented one space too far",
        text("merge_method: linear\nmodels:\n  - model: {ft1}\n   parameters: {{weight: 1}}\n"),
        ("{config}:4:", "YAML syntax error"),
    ),
    Case(
        "yaml-unclosed-bracket",
        "YAML: an unclosed [",
        text("merge_method: linear\nmodels: [{ft1}, {ft2}\nout: x\n"),
        ("{config}:3:", "YAML syntax error"),
    ),
    Case(
        "yaml-unclosed-quote",
        "YAML: an unclosed quote",
        text('merge_method: "linear\nmodels:\n  - model: {ft1}\n'),
        ("{config}:", "YAML syntax error"),
    ),
    Case(
        "yaml-tab",
        "YAML: a tab used for indentation",
        text("merge_method: linear\nmodels:\n\t- model: {ft1}\n"),
        ("{config}:3:1", "YAML syntax error"),
    ),
    Case(
        "yaml-duplicate-key",
        "YAML: the same key twice (PyYAML would keep the last one silently)",
        text("merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1, weight: 2}}\n"),
        ("{config}:4:", "'weight' is given twice"),
    ),
    Case("yaml-empty", "an empty config file", text(""), ("{config}: the config is empty",)),
    Case(
        "yaml-bomb",
        "YAML: aliases that expand to a billion values (billion laughs)",
        text(
            "merge_method: linear\nmodels:\n  - model: [&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol], "
            + ", ".join(f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10))
            + "]\n"
        ),
        ("{config}: the config expands to more than 100000 values",),
    ),
    Case(
        "yaml-self-reference",
        "YAML: a list that contains itself",
        text("merge_method: linear\nmodels: &m [*m]\n"),
        ("{config}: the config expands to more than",),
    ),
    Case(
        "yaml-too-deep",
        "YAML: lists nested 1200 deep",
        text("merge_method: linear\nmodels: " + "[" * 1200 + "]" * 1200 + "\n"),
        ("{config}: the YAML is nested too deeply",),
    ),
    Case(
        "yaml-not-mapping",
        "YAML: a list instead of a mapping",
        text("- linear\n- {ft1}\n"),
        ("{config}", "must be a YAML mapping"),
    ),
    # --- unknown keys and misspelled parameters, with a suggestion ---
    Case(
        "typo-top-key",
        "misspelled top-level key",
        lambda m, d: {"merge_methd": "linear", "models": [str(m["ft1"])]},
        ("unknown key 'merge_methd'", "did you mean 'merge_method'?"),
    ),
    Case(
        "typo-base-model",
        "misspelled base_model",
        lambda m, d: dense("task_arithmetic", TWO)(m, d) | {"base_modle": str(m["base"])},
        ("unknown key 'base_modle'", "did you mean 'base_model'?"),
    ),
    Case(
        "typo-model-key",
        "misspelled key in a models entry",
        lambda m, d: {"merge_method": "linear", "models": [{"modle": str(m["ft1"])}]},
        ("models[0]", "unknown key 'modle'", "did you mean 'model'?"),
    ),
    Case(
        "typo-weight",
        "misspelled parameter (wieght)",
        dense("linear", [("ft1", {"wieght": 1.0}), ("ft2", W1)]),
        ("models[0].parameters", "no parameter 'wieght'", "did you mean 'weight'?"),
    ),
    Case(
        "typo-density",
        "misspelled parameter (densty)",
        dense("ties", [("ft1", {"weight": 1, "densty": 0.5}), ("ft2", W1)], **TA),
        ("no parameter 'densty'", "did you mean 'density'?"),
    ),
    Case(
        "typo-method",
        "misspelled merge method",
        dense("lineer", TWO),
        ("merge_method", "unknown merge method 'lineer'", "did you mean 'linear'?"),
    ),
    Case(
        "typo-layer-range",
        "misspelled layer_range",
        lambda m, d: {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(m["ft1"]), "layer_rang": [0, 2]}]}],
        },
        ("slices[0].sources[0]", "unknown key 'layer_rang'", "did you mean 'layer_range'?"),
    ),
    Case(
        "typo-dtype",
        "misspelled dtype",
        dense("linear", TWO, dtype="bfloat61"),
        ("dtype", "unknown dtype 'bfloat61'", "did you mean 'bfloat16'?"),
    ),
    Case(
        "moe-typo-gate-mode-key",
        "MoE: misspelled gate_mode key",
        lambda m, d: moe([("ft1", ["a"]), ("ft2", ["b"])])(m, d) | {"gate_mod": "random"},
        ("unknown key 'gate_mod'", "did you mean 'gate_mode'?"),
    ),
    Case(
        "moe-typo-prompts",
        "MoE: misspelled positive_prompts",
        lambda m, d: {
            "base_model": str(m["base"]),
            "experts": [{"source_model": str(m["ft1"]), "positive_prompt": ["a"]}],
        },
        ("experts[0]", "unknown key 'positive_prompt'", "did you mean 'positive_prompts'?"),
    ),
    Case(
        "moe-typo-gate-mode",
        "MoE: unknown gate_mode value",
        moe([("ft1", ["a"]), ("ft2", ["b"])], gate_mode="hiden"),
        ("gate_mode 'hiden'", "did you mean 'hidden'?"),
    ),
    # --- wrong types ---
    Case(
        "models-not-list",
        "models: a string instead of a list",
        lambda m, d: {"merge_method": "linear", "models": 7},
        ("models", "expected a non-empty list"),
    ),
    Case(
        "weight-string",
        "a weight that is a word",
        dense("linear", [("ft1", {"weight": "heavy"}), ("ft2", W1)]),
        ("models[0].parameters.weight", "expected float", "heavy"),
    ),
    Case(
        "normalize-number",
        "a boolean parameter given a number",
        dense("linear", TWO, parameters={"normalize": 3}),
        ("parameters.normalize", "expected bool"),
    ),
    Case(
        "layer-range-string",
        "layer_range with a string end",
        sliced(("ft1", [0, "2"])),
        ("slices[0].sources[0].layer_range", "expected [start, end] integers"),
    ),
    Case(
        "model-number",
        "a model path that is a number",
        lambda m, d: {"merge_method": "linear", "models": [{"model": 42}]},
        ("models[0].model", "expected a model path"),
    ),
    Case(
        "moe-gate-mode-list",
        "MoE: gate_mode given as a list",
        moe([("ft1", ["a"]), ("ft2", ["b"])], gate_mode=["hidden"]),
        ("gate_mode ['hidden'] is unknown",),
    ),
    Case(
        "moe-k-float",
        "MoE: experts_per_token 1.5",
        moe([("ft1", ["a"]), ("ft2", ["b"])], experts_per_token=1.5),
        ("experts_per_token must be an integer",),
    ),
    # --- out-of-range values ---
    Case(
        "density-zero",
        "density 0 (outside (0, 1])",
        dense("ties", [("ft1", {"weight": 1, "density": 0}), ("ft2", W1)], **TA),
        ("models[0].parameters.density", "must be in (0, 1]"),
    ),
    Case(
        "density-above-one",
        "density 1.5",
        dense("dare_ties", [("ft1", {"weight": 1, "density": 1.5}), ("ft2", W1)], **TA),
        ("models[0].parameters.density", "must be in (0, 1]"),
    ),
    Case(
        "slerp-t-above-one",
        "slerp t 1.5 (outside [0, 1])",
        dense("slerp", [("ft1", {})], parameters={"t": 1.5}, **TA),
        ("parameters.t", "must be in [0, 1]"),
    ),
    Case(
        "slerp-t-negative",
        "slerp t -0.1",
        dense("slerp", [("ft1", {})], parameters={"t": -0.1}, **TA),
        ("parameters.t", "must be in [0, 1]"),
    ),
    Case(
        "slerp-t-gradient-out",
        "slerp t gradient with a value above 1",
        dense("slerp", [("ft1", {})], parameters={"t": [0, 1.2]}, **TA),
        ("parameters.t", "1.2", "must be in [0, 1]"),
    ),
    Case(
        "nearswap-negative",
        "negative nearswap t (a distance)",
        dense("nearswap", [("ft1", {})], parameters={"t": -1}, **TA),
        ("parameters.t", "must be >= 0"),
    ),
    Case(
        "weights-cancel",
        "linear weights that sum to 0 (a negative weight cancels the other)",
        dense("linear", [("ft1", {"weight": 0.5}), ("ft2", {"weight": -0.5})]),
        ("weights sum to 0",),
    ),
    Case(
        "moe-noise-negative",
        "MoE: negative noise_scale",
        lambda m, d: {
            "base_model": str(m["base"]),
            "gate_mode": "random",
            "experts": [{"source_model": str(m["ft1"]), "noise_scale": -1}, {"source_model": str(m["ft2"])}],
        },
        ("experts[0].noise_scale", "must be >= 0"),
    ),
    Case(
        "layer-range-reversed",
        "layer_range [2, 1]",
        sliced(("ft1", [2, 1])),
        ("layer_range", "0 <= start < end"),
    ),
    # --- gradient lists of the wrong length ---
    Case(
        "gradient-empty",
        "an empty gradient list",
        dense("linear", [("ft1", {"weight": []}), ("ft2", W1)]),
        ("models[0].parameters.weight", "empty list"),
    ),
    Case(
        "gradient-mixed",
        "a gradient mixing numbers and conditions",
        dense("linear", [("ft1", {"weight": [0.5, {"filter": "mlp", "value": 1}]}), ("ft2", W1)]),
        ("models[0].parameters.weight", "mix of values and conditions"),
    ),
    # --- layer ranges and slices ---
    Case(
        "layer-range-past",
        "layer_range past the model's last layer",
        sliced(("ft1", [0, 9])),
        ("slices[0].sources[0].layer_range [0, 9]", "has 2 layers"),
    ),
    Case(
        "slice-spans-differ",
        "slice sources spanning different layer counts",
        sliced(("ft1", [0, 2]), ("ft2", [0, 1]), method="linear"),
        ("slices[0]", "same number of layers"),
    ),
    Case(
        "models-and-slices",
        "both models and slices",
        lambda m, d: (
            linear_config(m["ft1"])
            | {"slices": [{"sources": [{"model": str(m["ft1"]), "layer_range": [0, 1]}]}]}
        ),
        ("exactly one of 'models', 'slices' or 'modules'",),
    ),
    Case(
        "passthrough-two",
        "passthrough with two models in one slice",
        sliced(("ft1", [0, 2]), ("ft2", [0, 2])),
        ("'passthrough' takes at most 1 models",),
    ),
    # --- models that are missing or not usable ---
    Case(
        "model-missing",
        "a model directory that does not exist",
        lambda m, d: linear_config(m["ft1"], d / "no-such-model"),
        ("models[1]", "no-such-model", "does not exist"),
    ),
    Case(
        "model-no-weights",
        "a model directory without weights",
        lambda m, d: linear_config(m["ft1"], m["noweights"]),
        ("{noweights}", "no model weights"),
    ),
    Case(
        "model-no-config",
        "a model directory without config.json",
        lambda m, d: linear_config(m["ft1"], m["noconfig"]),
        ("{noconfig}", "has no config.json"),
    ),
    Case(
        "model-is-file",
        "a model path that is a file",
        lambda m, d: linear_config(m["ft1"], m["afile"]),
        ("{afile}", "is a file, not a model directory"),
    ),
    Case(
        "hub-id",
        "a hub id instead of a local directory",
        lambda m, d: {"merge_method": "linear", "models": [str(m["ft1"]), "meta-llama/Llama-3.1-8B"]},
        ("'meta-llama/Llama-3.1-8B' is not a local directory", "never downloads"),
    ),
    Case(
        "base-missing",
        "task_arithmetic without a base_model",
        dense("task_arithmetic", TWO),
        ("'task_arithmetic' needs a base_model",),
    ),
    Case(
        "no-out",
        "no -o and no out: in the config",
        dense("linear", TWO),
        ("no output directory",),
        give_out=False,
    ),
    Case(
        "out-is-input",
        "-o naming an input model, with --force",
        lambda m, d: _output_holding_input(m, d),
        ("output '{dir}/mine' is or contains the input model",),
        args=("-o", "{dir}/mine", "--force"),
        give_out=False,
    ),
    Case(
        "out-contains-input",
        "-o naming a directory that holds an input model, with --force",
        lambda m, d: _output_holding_input(m, d),
        ("output '{dir}' is or contains the input model '{dir}/mine'",),
        args=("-o", "{dir}", "--force"),
        give_out=False,
    ),
    # --- models that cannot be merged together ---
    Case(
        "mixed-arch",
        "a Llama and a Qwen2 model",
        lambda m, d: linear_config(m["ft1"], m["qwen"]),
        ("different architectures", "is llama", "is qwen2"),
    ),
    Case(
        "shape-mismatch",
        "models with different MLP widths",
        lambda m, d: linear_config(m["ft1"], m["ffn"]),
        ("model.layers.0.mlp.down_proj.weight", "shapes differ"),
    ),
    Case(
        "hidden-mismatch",
        "models with different hidden sizes",
        lambda m, d: linear_config(m["ft1"], m["wide"]),
        ("model.embed_tokens.weight", "shapes differ", "[64, 16]", "[64, 32]"),
    ),
    Case(
        "vocab-mismatch",
        "models with different vocabularies (no tokenizer_source)",
        lambda m, d: linear_config(m["ft1"], m["bigvocab"]),
        ("model.embed_tokens.weight", "vocabulary sizes differ", "tokenizer_source"),
    ),
    Case(
        "slerp-three",
        "slerp with 3 models",
        dense("slerp", [("ft1", {}), ("ft2", {})], parameters={"t": 0.5}, **TA),
        ("'slerp' takes at most 1 models besides the base, got 2",),
    ),
    Case(
        "model-stock-two",
        "model_stock with 2 models (base + 1)",
        dense("model_stock", [("ft1", {})], **TA),
        ("'model_stock' needs at least 2 models besides the base, got 1",),
    ),
    # --- MoE ---
    Case(
        "moe-too-few-experts",
        "MoE: fewer experts than experts_per_token",
        moe([("ft1", ["code"])], experts_per_token=2),
        ("1 expert(s) but experts_per_token is 2",),
    ),
    Case(
        "moe-no-experts",
        "MoE: an empty experts list",
        lambda m, d: {"base_model": str(m["base"]), "experts": []},
        ("experts", "expected a non-empty list"),
    ),
    Case(
        "moe-missing-prompts",
        "MoE: an expert without positive_prompts (gate_mode hidden)",
        moe([("ft1", ["code"]), ("ft2", None)]),
        ("experts[1]", "no positive_prompts"),
    ),
    Case(
        "moe-identical-prompts",
        "MoE: every expert with the same prompts",
        moe([("ft1", ["code"]), ("ft2", ["code"])]),
        ("every expert has the same prompts",),
    ),
    Case(
        "moe-upcycle-one",
        "MoE upcycle: 1 expert for 2 per token",
        lambda m, d: {"base_model": str(m["base"]), "gate_mode": "random", "upcycle": {"num_experts": 1}},
        ("1 expert(s) but experts_per_token is 2",),
    ),
    Case(
        "moe-hub-base",
        "MoE: a hub id as base_model",
        moe([("ft1", ["a"]), ("ft2", ["b"])], base="mistralai/Mistral-7B-v0.1"),
        ("'mistralai/Mistral-7B-v0.1' is not a local directory",),
    ),
    Case(
        "moe-missing-expert",
        "MoE: an expert directory that does not exist",
        lambda m, d: (
            moe([("ft1", ["a"])], gate_mode="random")(m, d)
            | {"experts": [{"source_model": str(m["ft1"])}, {"source_model": str(d / "gone")}]}
        ),
        ("experts[1]", "does not exist"),
    ),
    Case(
        "moe-architecture",
        "MoE: an architecture moekit does not build",
        moe([("ft1", ["a"]), ("ft2", ["b"])], architecture="deepseek"),
        ("architecture 'deepseek' is not supported",),
    ),
    Case(
        "moe-two-shared",
        "MoE: two shared experts",
        lambda m, d: (
            moe([("ft1", ["a"]), ("ft2", ["b"])])(m, d)
            | {"shared_experts": [{"source_model": str(m["ft1"])}, {"source_model": str(m["ft2"])}]}
        ),
        ("shared_experts has 2 entries",),
    ),
    Case(
        "moe-mixed-arch",
        "MoE: experts of another architecture",
        moe([("ft1", ["a"]), ("qwen", ["b"])], gate_mode="random"),
        ("qwen",),
    ),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: c.id)
def test_broken_config_fails_in_one_line(case, micro_models, tmp_path):
    result, out, needles = run_case(case, micro_models, tmp_path / case.id)
    assert_failed_cleanly(result, out, *needles)


def test_the_table_covers_the_issue():
    assert len(CONFIG_CASES) >= 40
    assert len({c.id for c in CONFIG_CASES}) == len(CONFIG_CASES)
    assert sum(c.id.startswith("moe-") for c in CONFIG_CASES) >= 10


@pytest.mark.parametrize("case_id", ["yaml-bad-indent", "moe-identical-prompts"])
def test_broken_config_in_a_real_process(case_id, micro_models, tmp_path):
    """The same one line and exit 2 from `python -m moekit` (no in-process shortcut hides a traceback)."""
    case = next(c for c in CONFIG_CASES if c.id == case_id)
    config = write_yaml(tmp_path / "config.yaml", case.config(micro_models, tmp_path))
    out = tmp_path / "out"
    proc = run_cli("merge", str(config), "-o", str(out))
    names = {k: str(v) for k, v in micro_models.items()} | {"dir": str(tmp_path), "config": str(config)}
    assert_one_line_error(proc, *(n.format(**names) for n in case.needles))
    assert not out.exists() and not list(tmp_path.glob(".*moekit-*"))
