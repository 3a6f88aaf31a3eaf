"""mergekit 0.1.5 configs and CLI habits: what mergekit accepts is accepted here, with mergekit's numbers.

Each merge is checked tensor by tensor against the formula written out in torch (fp32, tolerance 1e-6 relative to
the tensor's scale) on micro Llamas with fresh random weights. Warnings are checked on a real subprocess's stderr.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_tensors
from helpers import assert_one_line_error, run_cli
from hostile_models import write_model, write_yaml

import moekit

TOL = 1e-6


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """A 2-layer base with three fine-tunes, and a 4-layer one; fresh random weights each session."""
    root = tmp_path_factory.mktemp("compat")
    seeds = torch.randint(0, 2**31, (5,)).tolist()
    out = {name: write_model(root / name, s) for name, s in zip(["base", "ft1", "ft2", "ft3"], seeds)}
    out["deep"] = write_model(root / "deep", seeds[4], layers=4)
    out["deep2"] = write_model(root / "deep2", seeds[4] + 1, layers=4)
    return out


def close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        scale = float(w.abs().max()) + 1e-12
        assert (got[name].float() - w).abs().max() <= TOL * scale, name


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[1] == "layers" else None


def test_unused_known_parameter_warns_and_changes_nothing(models, tmp_path):
    """`weight` under sce (left over from a ties config): one warning naming method and parameter, exit 0, and
    exactly the numbers of the same config without it."""
    plain = {
        "merge_method": "sce",
        "base_model": str(models["base"]),
        "models": [{"model": str(models[m])} for m in ("ft1", "ft2")],
        "parameters": {"select_topk": 0.5},
    }
    leftover = plain | {
        "models": [
            {"model": str(models[m]), "parameters": {"weight": 0.7, "density": 0.5}} for m in ("ft1", "ft2")
        ]
    }
    leftover["parameters"] = {"select_topk": 0.5, "lambda": 2.0}
    cfg = write_yaml(tmp_path / "leftover.yaml", leftover)
    proc = run_cli("merge", str(cfg), str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if "WARNING" in ln]
    assert any("'sce' does not use 'weight'" in ln and "mergekit ignores it too" in ln for ln in warnings)
    assert any("'sce' does not use 'density'" in ln for ln in warnings)
    assert any("'sce' does not use 'lambda'" in ln for ln in warnings)
    assert len(warnings) == 3, proc.stderr  # one line per parameter, not one per model
    b = moekit.merge(plain, tmp_path / "b")
    a_t, b_t = load_tensors(tmp_path / "a"), load_tensors(b)
    assert a_t.keys() == b_t.keys() and all(torch.equal(a_t[k], b_t[k]) for k in a_t)


@pytest.mark.parametrize(
    ("method", "params", "needles"),
    [
        ("linear", {"wieght": 1.0}, ("no parameter 'wieght'", "did you mean 'weight'?")),
        ("ties", {"weight": 1.0, "densty": 0.5}, ("no parameter 'densty'", "did you mean 'density'?")),
        ("linear", {"weight": 1.0, "bogus_knob": 3}, ("no parameter 'bogus_knob'",)),
    ],
)
def test_typos_and_unknown_names_stay_errors(models, tmp_path, method, params, needles):
    cfg = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models["ft1"]), "parameters": params}],
    }
    proc = run_cli("merge", str(write_yaml(tmp_path / "c.yaml", cfg)), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, *needles)


def test_global_parameter_per_model_is_ignored_as_mergekit_does(models, tmp_path, caplog):
    base, f1 = load_tensors(models["base"]), load_tensors(models["ft1"])
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [{"model": str(models["ft1"]), "parameters": {"weight": 0.8, "lambda": 5.0}}],
    }
    with caplog.at_level("WARNING", logger="moekit"):
        out = load_tensors(moekit.merge(cfg, tmp_path / "out"))
    assert "'lambda' is a global parameter of 'task_arithmetic'" in caplog.text
    close(out, {k: base[k] + 0.8 * (f1[k] - base[k]) for k in base})


def test_scientific_notation_and_boolean_gradients(models, tmp_path):
    """`lambda: 2e-1` is a number (YAML 1.1 reads it as a string; mergekit's pydantic reads the number) and
    `normalize: [0, 1]` is False at layer 0 (and the embeddings, t = 0) and True at the last layer."""
    text = f"""
merge_method: task_arithmetic
base_model: {models["base"]}
models:
  - model: {models["ft1"]}
    parameters: {{weight: 1e-0}}
  - model: {models["ft2"]}
    parameters: {{weight: 3E-1}}
parameters:
  lambda: 2e-1
  normalize: [0, 1]
"""
    out = load_tensors(moekit.merge(text, tmp_path / "out"))
    base, f1, f2 = (load_tensors(models[m]) for m in ("base", "ft1", "ft2"))
    want = {}
    for k in base:
        delta = 1.0 * (f1[k] - base[k]) + 0.3 * (f2[k] - base[k])
        normalize = layer_of(k) == 1
        want[k] = base[k] + 0.2 * (delta / 1.3 if normalize else delta)
    close(out, want)


def test_base_model_is_one_more_input_of_linear(models, tmp_path):
    """mergekit adds a base_model that is not among `models` as one more input, also for linear; its weight
    comes from the global parameters."""
    cfg = {
        "merge_method": "linear",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["ft1"]), "parameters": {"weight": 0.6}},
            {"model": str(models["ft2"])},
        ],
        "parameters": {"weight": 0.25},
    }
    out = load_tensors(moekit.merge(cfg, tmp_path / "out"))
    b, f1, f2 = (load_tensors(models[m]) for m in ("base", "ft1", "ft2"))
    close(out, {k: (0.6 * f1[k] + 0.25 * f2[k] + 0.25 * b[k]) / 1.1 for k in b})
    no_weight = cfg | {
        "models": [{"model": str(models[m]), "parameters": {"weight": 1}} for m in ("ft1", "ft2")]
    }
    no_weight["parameters"] = {}
    proc = run_cli("merge", str(write_yaml(tmp_path / "nw.yaml", no_weight)), "-o", str(tmp_path / "nw"))
    assert_one_line_error(proc, "base_model", "needs parameter 'weight'", "one more input")


def mergekit_gradient(values: list[float], t: float) -> float:
    """mergekit's piecewise-linear gradient (config.evaluate_setting), written out."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    return (1 - (scaled - i0)) * values[i0] + (scaled - i0) * values[i1]


def test_gradient_longer_than_the_layers_interpolates(models, tmp_path, caplog):
    """5 values over 4 layers: every value shapes some layer (no warning); over 2 layers the middle three reach
    none, which is the only case worth a warning."""
    grad = torch.rand(5).add(0.1).tolist()
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(models["deep"]), "parameters": {"weight": grad}},
            {"model": str(models["deep2"]), "parameters": {"weight": 1.0}},
        ],
    }
    with caplog.at_level("WARNING", logger="moekit"):
        out = load_tensors(moekit.merge(cfg, tmp_path / "deep"))
    assert "reach no layer" not in caplog.text
    a, b = load_tensors(models["deep"]), load_tensors(models["deep2"])
    want = {}
    for k in a:
        layer = layer_of(k)
        w = mergekit_gradient(grad, 0.0 if layer is None else layer / 3)
        want[k] = (w * a[k] + b[k]) / (w + 1)
    close(out, want)

    cfg["models"] = [
        {"model": str(models["ft1"]), "parameters": {"weight": grad}},
        {"model": str(models["ft2"])},
    ]
    cfg["parameters"] = {"weight": 1.0}
    caplog.clear()
    with caplog.at_level("WARNING", logger="moekit"):
        moekit.merge(cfg, tmp_path / "shallow")
    assert "reach no layer" in caplog.text and f"{grad[2]}" in caplog.text


def test_relative_paths_follow_the_config_not_the_working_directory(models, tmp_path):
    """A config in one folder names `models/m`; a different `models/m` in the working directory is not used."""
    here, there = tmp_path / "configs", tmp_path / "cwd"
    for root, src in ((here, "ft1"), (there, "ft2")):
        (root / "models").mkdir(parents=True)
        (root / "models" / "m").symlink_to(models[src], target_is_directory=True)
    cfg = write_yaml(
        here / "c.yaml",
        {"merge_method": "linear", "models": ["models/m"], "parameters": {"weight": 1}, "out": "merged"},
    )
    proc = run_cli("merge", str(cfg), "--dry-run", cwd=there)
    assert proc.returncode == 0, proc.stderr
    assert f"input: {here / 'models' / 'm'} " in proc.stdout  # the plan shows the absolute path it resolved
    proc = run_cli("merge", str(cfg), cwd=there)
    assert proc.returncode == 0, proc.stderr
    got, want = load_tensors(here / "merged"), load_tensors(models["ft1"])
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_mergekit_cli_habits(models, tmp_path):
    cfg = write_yaml(
        tmp_path / "c.yaml",
        {
            "merge_method": "linear",
            "models": [str(models["ft1"]), str(models["ft2"])],
            "parameters": {"weight": 1},
        },
    )
    # mergekit-yaml CONFIG OUT, its shard size (a count: 10K = 10,000, compared with tensor bytes), its switches
    out = tmp_path / "out"
    proc = run_cli(
        "merge", str(cfg), str(out), "--out-shard-size", "10K", "--no-write-model-card", "--no-copy-tokenizer",
        "--lazy-unpickle", "--allow-crimes", "--random-seed", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--lazy-unpickle: taken as --allow-pickle" in proc.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = {f.name for f in out.glob("*.safetensors")}
    assert len(shards) > 1 and set(index["weight_map"].values()) == shards
    assert not (out / "README.md").exists() and (out / "moekit_config.yaml").exists()
    assert not list(out.glob("tokenizer*"))
    assert_one_line_error(
        run_cli("merge", str(cfg), str(tmp_path / "x"), "--shard-size", "5B"), "ambiguous unit"
    )
    assert_one_line_error(
        run_cli("merge", str(cfg), str(tmp_path / "x"), "--trust-remote-code"), "never runs code"
    )
    assert_one_line_error(
        run_cli("merge", str(cfg), str(tmp_path / "x"), "-o", str(tmp_path / "y")), "two output directories"
    )


def test_chat_template_written_where_transformers_reads_it(tiny_llama, tmp_path):
    """chat_template: a built-in name or Jinja text ends up in the output tokenizer (AutoTokenizer renders it);
    `auto` takes the template most inputs carry; anything else is refused with a suggestion."""
    from transformers import AutoTokenizer

    models = [{"model": str(tiny_llama[m]), "parameters": {"weight": 1}} for m in ("ft1", "ft2")]
    chat = [{"role": "user", "content": "hi"}]
    out = moekit.merge(
        {"merge_method": "linear", "models": models, "chat_template": "chatml"}, tmp_path / "a"
    )
    text = AutoTokenizer.from_pretrained(out).apply_chat_template(chat, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
    jinja = "{% for m in messages %}<<{{ m['role'] }}:{{ m['content'] }}>>{% endfor %}"
    out = moekit.merge({"merge_method": "linear", "models": models, "chat_template": jinja}, tmp_path / "b")
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(chat, tokenize=False) == "<<user:hi>>"
    auto = [{"model": str(out), "parameters": {"weight": 1}}, *models[:1], {"model": str(out)}]
    out = moekit.merge(
        {"merge_method": "linear", "models": auto, "parameters": {"weight": 1}, "chat_template": "auto"},
        tmp_path / "c",
    )
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(chat, tokenize=False) == "<<user:hi>>"
    bad = write_yaml(
        tmp_path / "bad.yaml", {"merge_method": "linear", "models": models, "chat_template": "chatm"}
    )
    assert_one_line_error(run_cli("merge", str(bad), str(tmp_path / "d")), "did you mean 'chatml'?")
