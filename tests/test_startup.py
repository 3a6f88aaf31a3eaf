"""User errors of `moekit merge` and `moekit route-stats` are reported before torch (or transformers) is imported.

A behaviour test, not a timing one: each case runs the CLI in a fresh interpreter, which then reports the exit
code and whether torch and transformers were imported. A valid --dry-run, which must import torch to plan,
shows that the probe does see torch when it is there. (bench/startup.py measures the seconds.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROBE = """
import json, sys
from moekit.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


def run_cli(*args: str, cwd: Path) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.fixture()
def workdir(tiny_llama, tmp_path) -> Path:
    """A folder with a valid config over copies of the tiny models, and broken variants of it."""
    for name in ("base", "ft1", "ft2"):
        shutil.copytree(tiny_llama[name], tmp_path / name)
    good = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}} for m in ("ft1", "ft2")],
        "dtype": "float32",
    }
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good, sort_keys=False))
    (tmp_path / "typo.yaml").write_text("merge_method: ties\nmodels:\n  - model: ft1\n   weight: 1\n")
    (tmp_path / "unknown_key.yaml").write_text(yaml.safe_dump({**good, "dtpye": "float32"}, sort_keys=False))
    model_key = {**good, "models": [{"modle": "ft1"}, *good["models"][1:]]}
    (tmp_path / "model_key.yaml").write_text(yaml.safe_dump(model_key, sort_keys=False))
    missing = {**good, "models": [{"model": "ft9"}, *good["models"][1:]]}
    (tmp_path / "missing_model.yaml").write_text(yaml.safe_dump(missing, sort_keys=False))
    cut = tmp_path / "ft2" / "model.safetensors"
    truncated = {**good, "models": [*good["models"][:1], {"model": "cut"}]}
    shutil.copytree(tmp_path / "ft2", tmp_path / "cut")
    (tmp_path / "cut" / "model.safetensors").write_bytes(cut.read_bytes()[:-100])
    (tmp_path / "truncated.yaml").write_text(yaml.safe_dump(truncated, sort_keys=False))
    (tmp_path / "taken").mkdir()
    broken = {
        "method": {**good, "merge_method": "tiess"},
        "parameter": {**good, "models": [{"model": "ft1", "parameters": {"weight": 1, "densty": 0.5}}]},
        "global_parameter": {**good, "parameters": {"lamda": 0.5}},
        "moe_key": {"base_model": "base", "gate_mod": "random", "experts": [{"source_model": "ft1"}]},
        "expert_key": {"base_model": "base", "experts": [{"source_model": "ft1", "positive_prompt": ["a"]}]},
        "upcycle_key": {"base_model": "base", "gate_mode": "random", "upcycle": {"num_expert": 4}},
    }
    for name, config in broken.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp_path


CASES = {
    "missing config": (["merge", "nothere.yaml", "-o", "out"], "config file 'nothere.yaml' does not exist"),
    "YAML syntax": (["merge", "typo.yaml", "-o", "out"], "typo.yaml:4:4: YAML syntax error"),
    "unknown key": (
        ["merge", "unknown_key.yaml", "-o", "out"],
        "unknown key 'dtpye' (did you mean 'dtype'?)",
    ),
    "unknown model key": (["merge", "model_key.yaml", "-o", "out"], "models[0]: unknown key 'modle'"),
    "missing model": (["merge", "missing_model.yaml", "-o", "out"], "models[0]: model directory 'ft9'"),
    "truncated weights": (["merge", "truncated.yaml", "-o", "out"], "cut/model.safetensors: tensor '"),
    "output exists": (["merge", "good.yaml", "-o", "taken"], "output 'taken' already exists; pass --force"),
    "unknown merge method": (
        ["merge", "method.yaml", "-o", "out"],
        "unknown merge method 'tiess' (did you mean",
    ),
    "misspelled parameter": (
        ["merge", "parameter.yaml", "-o", "out"],
        "models[0].parameters: 'ties' has no parameter 'densty' (did you mean 'density'?)",
    ),
    "misspelled global parameter": (
        ["merge", "global_parameter.yaml", "-o", "out"],
        "parameters: 'ties' has no parameter 'lamda' (did you mean 'lambda'?)",
    ),
    "MoE key": (["merge", "moe_key.yaml", "-o", "out"], "unknown key 'gate_mod' (did you mean 'gate_mode'?)"),
    "MoE expert key": (
        ["merge", "expert_key.yaml", "-o", "out"],
        "experts[0]: unknown key 'positive_prompt'",
    ),
    "MoE upcycle key": (["merge", "upcycle_key.yaml", "-o", "out"], "upcycle: unknown key 'num_expert'"),
    "no output directory": (["merge", "good.yaml"], "no output directory: pass -o/--out DIR"),
    "two outputs": (["merge", "good.yaml", "out", "-o", "out2"], "two output directories"),
    "seeds disagree": (["merge", "good.yaml", "-o", "out", "--seed", "1", "--random-seed", "2"], "disagree"),
    "shard size in parameters": (["merge", "good.yaml", "-o", "out", "--shard-size", "5B"], "--shard-size"),
    "route-stats: missing model": (
        ["route-stats", "nothere", "--prompts", "good.yaml"],
        "model directory not found",
    ),
    "route-stats: no config.json": (
        ["route-stats", "taken", "--prompts", "good.yaml"],
        "taken has no config.json",
    ),
    "route-stats: missing prompts": (
        ["route-stats", "base", "--prompts", "nofile.txt"],
        "prompts file not found",
    ),
    "route-stats: missing labelled prompts": (
        ["route-stats", "base", "--prompts", "a=good.yaml", "--prompts", "b=nofile.txt"],
        "prompts file not found: nofile.txt",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_user_error_comes_before_torch(case, workdir):
    args, message = CASES[case]
    result, stderr = run_cli(*args, cwd=workdir)
    assert result == {"code": 2, "torch": False, "transformers": False}, stderr
    assert stderr.startswith("moekit: error: ") and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not (workdir / "out").exists()


def test_help_needs_no_torch(tmp_path):
    result, _ = run_cli("--help", cwd=tmp_path)
    assert result == {"code": 0, "torch": False, "transformers": False}


def test_the_probe_sees_torch_when_a_merge_plans(workdir):
    result, stderr = run_cli("merge", "good.yaml", "-o", "out", "--dry-run", cwd=workdir)
    assert result["code"] == 0 and result["torch"], stderr


CONFIG_CASES = [c for c in CASES if CASES[c][0][0] == "merge" and len(CASES[c][0]) == 4]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=CONFIG_CASES)
def test_the_early_check_words_it_as_the_merge_does(case, workdir, monkeypatch):
    """moekit.merge (which runs no preflight) refuses the same config with the same line."""
    import moekit
    from moekit.errors import UserError

    args, _ = CASES[case]
    result, stderr = run_cli(*args, cwd=workdir)
    monkeypatch.chdir(workdir)
    with pytest.raises(UserError) as refused:
        moekit.merge(args[1], args[3])
    assert stderr.strip() == f"moekit: error: {refused.value}"
