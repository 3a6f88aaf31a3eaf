"""Merges that used to finish with a wrong result or a traceback: quantised and integer tensors, values that do
not fit the output dtype, tensors only a non-reference model has, duplicate header names, absurd layer numbers
and parameters, tiny weights, hidden-state gates on a model whose tokenizer or weights do not fit it, and a
`moekit` folder in the working directory. The table here also feeds the summary table in tests/README.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_tensors
from hostile_models import Case, assert_failed_cleanly, linear_config, micro_models, run_case, write_yaml
from safetensors.torch import load_file, save_file
from test_hostile_checkpoints import BAD, LIED, broken, edit_config, edit_tensors, join_header, split_header

import moekit

__all__ = ["MERGE_CASES", "micro_models"]

TOL = 1e-6  # fp32 merges of two models against the formula, as in test_merge_basic
BIG_LAYER = "9" * 5000


def rename_tensor(old: str, new: str):
    """Rename tensor `old` to `new` in the header (the bytes stay where they are)."""

    def edit(bad: Path):
        f = bad / "model.safetensors"
        header, data = split_header(f.read_bytes())
        header[new] = header.pop(old)
        f.write_bytes(join_header(header, data))

    return edit


def duplicate_name(bad: Path) -> None:
    """The header JSON names one tensor twice, pointing at different bytes (a JSON reader keeps the last)."""
    f = bad / "model.safetensors"
    header, data = split_header(f.read_bytes())
    up = header.pop("model.layers.0.mlp.up_proj.weight")
    text = json.dumps(header)[:-1] + f', "{LIED}": ' + json.dumps(up) + "}"
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def as_dtype(dtype: torch.dtype, name: str = LIED):
    return edit_tensors(lambda t: t.__setitem__(name, (t[name] * 1000).to(dtype)))


def scaled(name: str, factor: float):
    return edit_tensors(lambda t: t.__setitem__(name, t[name] * factor))


def with_bias(bad: Path) -> None:
    edit_tensors(lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.randn(16)))(bad)
    edit_config(attention_bias=True)(bad)


def float8(m, d):
    """Two models stored in float8_e4m3fn (its largest value is 448) whose plain sum reaches 576 in one place."""
    models = []
    for name in ("a", "b"):
        bad = shutil.copytree(m["ft1"], d / name)
        edit_tensors(lambda t: t[LIED].__setitem__((3, 5), 288.0))(bad)
        edit_tensors(lambda t: t.update({k: x.to(torch.float8_e4m3fn) for k, x in t.items()}))(bad)
        models.append(bad)
    return linear_config(*models) | {"parameters": {"normalize": False}}


def moe(**expert_changes):
    def build(m, d):
        experts = [{"source_model": str(m["ft1"])}, {"source_model": str(m["ft2"])}]
        experts[0] |= expert_changes
        return {"base_model": str(m["base"]), "gate_mode": "random", "experts": experts}

    return build


def moe_quantised(m, d):
    bad = shutil.copytree(m["ft2"], d / "bad")
    edit_config(quantization_config={"quant_method": "gptq", "bits": 4})(bad)
    return moe()(m, d) | {"experts": [{"source_model": str(m["ft1"])}, {"source_model": str(bad)}]}


def moe_prompts(m, d):
    return {
        "base_model": str(m["base"]),
        "gate_mode": "hidden",
        "experts": [
            {
                "source_model": str(m["ft1"]),
                "positive_prompts": ["code", "tests"],
                "negative_prompts": ["tests", "code"],
            },
            {"source_model": str(m["ft2"]), "positive_prompts": ["law"]},
        ],
    }


def weights(w1: float, w2: float):
    return lambda m, d: {
        "merge_method": "linear",
        "models": [
            {"model": str(m["ft1"]), "parameters": {"weight": w1}},
            {"model": str(m["ft2"]), "parameters": {"weight": w2}},
        ],
    }


MERGE_CASES: list[Case] = [
    # --- quantised and integer tensors (item 5) ---
    Case(
        "quantised-config",
        "a GPTQ model (config.json has quantization_config) in a linear merge",
        broken(edit_config(quantization_config={"quant_method": "gptq", "bits": 4})),
        (f"{BAD}/config.json", "is quantised (gptq", "'linear' would do arithmetic"),
    ),
    Case(
        "int32-tensor",
        "an int32 tensor (a GPTQ/AWQ pack) in a linear merge",
        broken(as_dtype(torch.int32)),
        (f"tensor '{LIED}' of '{BAD}' holds integers (int32", "'linear' would compute with them"),
    ),
    Case(
        "u64-tensor",
        "a U64 tensor in a linear merge",
        broken(as_dtype(torch.uint64)),
        ("holds integers (uint64",),
    ),
    # --- the output dtype (item 6) ---
    Case(
        "float16-overflow",
        "finite float32 values past float16's range, with out_dtype: float16",
        lambda m, d: broken(scaled(LIED, 1e5))(m, d) | {"out_dtype": "float16"},
        (f"tensor '{LIED}': merged values up to", "do not fit float16 (largest 65504)", "out_dtype: float32"),
    ),
    Case(
        "float8-saturates",
        "float8_e4m3fn models whose sum, 576, passes 448 (a cast would clamp it)",
        float8,
        (f"tensor '{LIED}': merged values up to 576 do not fit float8_e4m3fn (largest 448)",),
    ),
    # --- tensors only a non-reference model has (item 7) ---
    Case(
        "bias-only-in-second",
        "q_proj.bias only in the second model (the first one's tensor list is the output's)",
        broken(with_bias),
        (f"tensor 'model.layers.0.self_attn.q_proj.bias' is in model '{BAD}' but not in", "would drop it"),
    ),
    # --- headers and layer numbers (items 9, tracebacks) ---
    Case(
        "header-duplicate-name",
        "a safetensors header naming one tensor twice",
        broken(duplicate_name),
        (f"{BAD}/model.safetensors: the header names '{LIED}' twice",),
    ),
    Case(
        "layer-5000-digits",
        "a tensor name with a 5000-digit layer number",
        broken(rename_tensor(LIED, f"model.layers.{BIG_LAYER}.mlp.down_proj.weight")),
        (f"{BAD}: tensor 'model.layers.999", "(5000 digits), past any real model"),
    ),
    Case(
        "layer-3e9",
        "a tensor in layer 3000000000 (config.json says as many)",
        broken(
            lambda bad: (
                rename_tensor(LIED, "model.layers.3000000000.mlp.down_proj.weight")(bad),
                edit_config(num_hidden_layers=3000000001)(bad),
            )
        ),
        ("is in layer 3000000000, past any real model",),
    ),
    # --- parameters (tracebacks, leftovers) ---
    Case(
        "weight-1e308",
        "linear weights of 1e308",
        weights(1e308, 1e308),
        ("models[0].parameters.weight: 1e+308 is not a finite number within float32's range",),
    ),
    Case(
        "weight-nan",
        "a linear weight of .nan",
        weights(float("nan"), 1.0),
        ("models[0].parameters.weight: nan is not a finite number",),
    ),
    Case(
        "moe-quantised-expert",
        "MoE: an expert source with quantization_config (GPTQ)",
        moe_quantised,
        (f"{BAD}/config.json", "is quantised (gptq", "an MoE build needs full-precision models"),
    ),
    Case(
        "moe-noise-nan",
        "MoE: noise_scale .nan",
        moe(noise_scale=float("nan")),
        ("experts[0].noise_scale: must be a finite number within float32's range (±3.4e38), got nan",),
    ),
    Case(
        "moe-residual-1e308",
        "MoE: residual_scale 1e308",
        moe(residual_scale=1e308),
        ("experts[0].residual_scale: must be a finite number", "got 1e+308"),
    ),
    Case(
        "moe-million-experts",
        "MoE: an upcycle of 1,000,000 experts",
        lambda m, d: {
            "merge_method": "moe",
            "base_model": str(m["base"]),
            "gate_mode": "random",
            "upcycle": {"num_experts": 1_000_000},
        },
        ("upcycle.num_experts is 1000000, more than any MoE has",),
        args=("--dry-run",),
    ),
    Case(
        "moe-negative-is-positive",
        "MoE: negative_prompts equal to positive_prompts (a zero router row)",
        moe_prompts,
        ("experts[0]: negative_prompts are the positive_prompts", "router vector is zero"),
    ),
]


@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: c.id)
def test_wrong_merge_is_refused_in_one_line(case, micro_models, tmp_path):
    result, out, needles = run_case(case, micro_models, tmp_path / case.id)
    assert_failed_cleanly(result, out, *needles)


def test_float16_overflow_with_allow_nonfinite_writes_inf(micro_models, tmp_path):
    bad = shutil.copytree(micro_models["ft2"], tmp_path / "bad")
    scaled(LIED, 1e5)(bad)
    out = moekit.merge(
        linear_config(micro_models["ft1"], bad) | {"out_dtype": "float16"},
        tmp_path / "out",
        allow_nonfinite=True,
    )
    got = load_tensors(out)[LIED]
    assert got.dtype == torch.float16 and torch.isinf(got).any()


def _saved(model: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model / "model.safetensors"))


def test_tiny_weights_keep_their_value(micro_models, tmp_path):
    """weight 1e-44 for both models, normalised: the average (a + b) / 2, not float32 subnormals' few bits."""
    cfg = weights(1e-44, 3e-44)(micro_models, tmp_path)
    got = load_tensors(moekit.merge(cfg, tmp_path / "out"))
    a, b = _saved(micro_models["ft1"]), _saved(micro_models["ft2"])
    for name, t in got.items():
        torch.testing.assert_close(t, (a[name] + 3 * b[name]) / 4, atol=TOL, rtol=1e-6)


def test_integer_tensors_are_copied_exactly_by_passthrough(micro_models, tmp_path):
    """int32 packs past 2**24 (float32 would round them) and a quantization_config pass through unchanged."""
    src = shutil.copytree(micro_models["ft1"], tmp_path / "q")
    packed = torch.randint(2**24, 2**31 - 1, (16, 32), dtype=torch.int32)
    edit_tensors(lambda t: t.__setitem__(LIED, packed))(src)
    edit_config(quantization_config={"quant_method": "gptq", "bits": 4})(src)
    cfg = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(src), "layer_range": [0, 2]}]}],
    }
    out = moekit.merge(cfg | {"dtype": "bfloat16"}, tmp_path / "out")
    got = load_tensors(out)
    assert got[LIED].dtype == torch.int32 and torch.equal(got[LIED], packed)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    # the float tensors follow `dtype` as before
    assert got["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16


def _tied(model: Path, dst: Path) -> Path:
    """A copy of `model` that ties its head to its embeddings (no lm_head tensor)."""
    shutil.copytree(model, dst)
    edit_tensors(lambda t: t.pop("lm_head.weight"))(dst)
    edit_config(tie_word_embeddings=True)(dst)
    return dst


def test_a_head_only_the_second_model_has_is_merged_and_untied(micro_models, tmp_path):
    """The first (reference) model is tied, the second has its own lm_head: as mergekit, the tied model gives its
    embeddings for the head, and the head is merged, not dropped; the output config unties it, and transformers
    loads that head."""
    from transformers import AutoModelForCausalLM

    tied = _tied(micro_models["ft1"], tmp_path / "tied")
    out = moekit.merge(linear_config(tied, micro_models["ft2"]), tmp_path / "out")
    got, a, b = load_tensors(out), _saved(tied), _saved(micro_models["ft2"])
    head = (a["model.embed_tokens.weight"] + b["lm_head.weight"]) / 2
    torch.testing.assert_close(got["lm_head.weight"], head, atol=TOL, rtol=0)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    torch.testing.assert_close(model.lm_head.weight.detach(), head, atol=TOL, rtol=0)


def test_a_tied_second_model_gives_its_embeddings_for_the_head(micro_models, tmp_path):
    tied = _tied(micro_models["ft2"], tmp_path / "tied")
    got = load_tensors(moekit.merge(linear_config(micro_models["ft1"], tied), tmp_path / "out"))
    a, b = _saved(micro_models["ft1"]), _saved(tied)
    torch.testing.assert_close(
        got["lm_head.weight"], (a["lm_head.weight"] + b["model.embed_tokens.weight"]) / 2, atol=TOL, rtol=0
    )


def test_merge_runs_from_a_folder_holding_a_moekit_directory(micro_models, tmp_path):
    """`python -m moekit` from a folder with a `moekit/` directory in it (a namespace package that shadows the
    installed one) finishes, model card included."""
    (tmp_path / "moekit").mkdir()
    write_yaml(tmp_path / "c.yaml", linear_config(micro_models["ft1"], micro_models["ft2"]))
    proc = subprocess.run(
        [sys.executable, "-m", "moekit", "merge", "c.yaml", "-o", "out", "-q"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"made with moekit {moekit.__version__}" in (tmp_path / "out" / "README.md").read_text()


# --- hidden-state gates on a base that transformers cannot run as given ---


def _shrunk_vocabulary(base: Path, dst: Path, rows: int) -> Path:
    """The base with only `rows` embedding rows (and vocab_size), but its full tokenizer."""
    shutil.copytree(base, dst)
    t = _saved(dst)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in t:
            t[name] = t[name][:rows].clone()
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    edit_config(vocab_size=rows)(dst)
    return dst


def _hidden_moe(base: Path) -> dict:
    return {
        "base_model": str(base),
        "gate_mode": "hidden",
        "experts": [
            {"source_model": str(base), "positive_prompts": ["def main(): return 1"]},
            {"source_model": str(base), "positive_prompts": ["the licence grants rights"]},
        ],
    }


def test_hidden_gates_with_token_ids_past_the_embedding(tiny_llama, tmp_path):
    from hostile_models import run_cli_in_process

    base = _shrunk_vocabulary(tiny_llama["base"], tmp_path / "small", rows=40)
    config = write_yaml(tmp_path / "c.yaml", _hidden_moe(base))
    result = run_cli_in_process("merge", str(config), "-o", str(tmp_path / "out"))
    assert_failed_cleanly(
        result, tmp_path / "out", f"{base}: the tokenizer gives the router prompts token id"
    )


def test_hidden_gates_on_weights_transformers_refuses(tiny_llama, tmp_path):
    """transformers raises RuntimeError (after printing a load report) when the weights do not fit the config."""
    from hostile_models import run_cli_in_process

    base = shutil.copytree(tiny_llama["base"], tmp_path / "bad")
    shape = _saved(base)["model.layers.0.mlp.up_proj.weight"].shape
    edit_config(intermediate_size=shape[0] + 8)(base)
    config = write_yaml(tmp_path / "c.yaml", _hidden_moe(base))
    result = run_cli_in_process("merge", str(config), "-o", str(tmp_path / "out"))
    assert_failed_cleanly(result, tmp_path / "out", str(base))


# --- limits: memory, disk, plan size (items 11, 12) ---


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried"
        ),
        RuntimeError("can't start new thread"),
    ],
    ids=["MemoryError", "torch-allocator", "thread-start"],
)
def test_out_of_memory_mid_merge_is_one_line_and_leaves_nothing(error, micro_models, tmp_path, monkeypatch):
    from hostile_models import run_cli_in_process

    import moekit.merging.engine as engine

    calls = []
    real = engine.MergeRunner.compute

    def compute(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise error
        return real(self, *args)

    monkeypatch.setattr(engine.MergeRunner, "compute", compute)
    config = write_yaml(tmp_path / "c.yaml", linear_config(micro_models["ft1"], micro_models["ft2"]))
    result = run_cli_in_process("merge", str(config), "-o", str(tmp_path / "out"), "--shard-size", "4KB")
    assert_failed_cleanly(result, tmp_path / "out", "out of memory", "nothing was written")


def test_a_runtime_error_that_is_not_memory_keeps_its_traceback(micro_models, tmp_path, monkeypatch):
    """Only memory errors are turned into a line: any other RuntimeError is a bug and must stay visible."""
    from hostile_models import run_cli_in_process

    import moekit.merging.engine as engine

    def compute(self, *args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine.MergeRunner, "compute", compute)
    config = write_yaml(tmp_path / "c.yaml", linear_config(micro_models["ft1"], micro_models["ft2"]))
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli_in_process("merge", str(config), "-o", str(tmp_path / "out"))


def run_with_little_disk(models, root: Path, monkeypatch, *extra: str):
    """`moekit merge` onto `root/out` where the disk has 10 kB free."""
    from hostile_models import run_cli_in_process

    import moekit.io.output_dir as output_dir

    real = shutil.disk_usage
    config = write_yaml(root / "c.yaml", linear_config(models["ft1"], models["ft2"]))
    with monkeypatch.context() as m:
        m.setattr(output_dir.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
        return run_cli_in_process("merge", str(config), "-o", str(root / "out"), *extra)


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_an_output_bigger_than_the_free_disk_is_refused(dry_run, micro_models, tmp_path, monkeypatch):
    result = run_with_little_disk(micro_models, tmp_path, monkeypatch, *(["--dry-run"] if dry_run else []))
    assert_failed_cleanly(
        result, tmp_path / "out", f"output '{tmp_path / 'out'}' needs ", "KiB but", "has 9.77 KiB free"
    )


def test_a_long_plan_is_summarised(micro_models, tmp_path):
    """An upcycle of 1000 experts is 6000 expert tensors: the dry run lists a few and counts the rest."""
    lines: list[str] = []
    cfg = {"merge_method": "moe", "base_model": str(micro_models["base"]), "gate_mode": "random"}
    cfg["upcycle"] = {"num_experts": 1000}
    assert moekit.merge(cfg, tmp_path / "moe", dry_run=True, print_fn=lines.append) is None
    assert len(lines) < 80, len(lines)
    skipped = [ln for ln in lines if "more tensors like these" in ln]
    listed = [ln for ln in lines if " <- " in ln]
    assert len(skipped) == 1 and int(skipped[0].split()[1]) + len(listed) == 2 * (6 + 1 + 3 * 1000) + 3
    assert "output: 6017 tensors" in "\n".join(lines)


def test_a_million_expert_upcycle_is_refused_at_once(micro_models, tmp_path):
    from hostile_models import run_cli_in_process

    cfg = {"merge_method": "moe", "base_model": str(micro_models["base"]), "gate_mode": "random"}
    config = write_yaml(tmp_path / "c.yaml", cfg | {"upcycle": {"num_experts": 1_000_000}})
    result = run_cli_in_process("merge", str(config), "-o", str(tmp_path / "out"), "--dry-run")
    assert_failed_cleanly(result, tmp_path / "out", "upcycle.num_experts is 1000000, more than any MoE has")
