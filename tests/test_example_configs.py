"""Every example in merge_configs/ runs as shipped, after `moekit example-models`, from a clean $MOEKIT_CACHE.

The examples are documentation users copy; this keeps them true. The configs are copied byte for byte into a
temporary folder (paths in a config are relative to its folder, so the copy resolves exactly as the original
does) and `moekit example-models` writes the models they name beside them. Nothing in a config is edited.

The demo_*.yaml configs name the demo's SmolLM2 checkpoints as ${MOEKIT_CACHE}/demo/models/smollm2-*; making
those needs the demo's download and fine-tune, which no test can run. So the tiny example models stand in for
them, linked where the demo links its models under a temporary $MOEKIT_CACHE, with $HOME pointed at an empty
folder: the merges can only find them by following $MOEKIT_CACHE.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_tensors

from moekit.cli import main

CONFIG_DIR = Path(__file__).parent.parent / "merge_configs"
EXAMPLES = sorted(CONFIG_DIR.glob("*.yaml"))


def run_cli(*args: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 0, args


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory) -> Path:
    """The shipped configs, copied unchanged, with `moekit example-models` run on their folder."""
    root = tmp_path_factory.mktemp("examples")
    for config in EXAMPLES:
        shutil.copyfile(config, root / config.name)
    run_cli("example-models", str(root))
    return root


@pytest.fixture()
def clean_cache(example_dir, tmp_path, monkeypatch) -> Path:
    """A fresh $MOEKIT_CACHE holding only the demo's model links (to stand-ins), and a $HOME with no cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOEKIT_CACHE", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    from moekit.demo.run import link_models

    stand_ins = {"smollm2-base": "base", "smollm2-code": "code", "smollm2-legal": "legal"}
    link_models(cache / "demo" / "models", {n: example_dir / "models" / m for n, m in stand_ins.items()})
    return cache


def test_every_method_has_an_example():
    from moekit.merging.registry import METHODS, get_method

    get_method("linear")  # imports every method module
    shown = {yaml.safe_load(p.read_text()).get("merge_method") for p in EXAMPLES}
    missing = sorted(set(METHODS) - shown)
    assert not missing, f"methods without an example in merge_configs/: {missing}"


def test_example_models_are_what_the_configs_name(example_dir):
    """5 Llama and 3 Qwen2 checkpoints and 3 LoRAs of the Llama base, each loadable by its library."""
    import json

    from peft import PeftConfig

    families = {
        p.name: json.loads((p / "config.json").read_text())["model_type"]
        for p in (example_dir / "models").iterdir()
    }
    assert families == {
        **dict.fromkeys(["base", "math", "code", "chat", "legal"], "llama"),
        **dict.fromkeys(["qwen2-base", "qwen2-code", "qwen2-math"], "qwen2"),
    }
    for name in ("math", "code", "chat"):
        adapter = PeftConfig.from_pretrained(str(example_dir / "loras" / name))
        assert adapter.r == 4 and Path(adapter.base_model_name_or_path).name == "base"


def test_example_models_rerun_keeps_them_and_refuses_foreign_directories(example_dir, tmp_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in (example_dir / "models").rglob("*.safetensors")}
    run_cli("example-models", str(example_dir))
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert capsys.readouterr().out.count("kept ") == 11

    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "weights.bin").write_bytes(b"mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["example-models", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "not made by `moekit example-models`" in capsys.readouterr().err
    assert (tmp_path / "models" / "base" / "weights.bin").read_bytes() == b"mine"
    assert not (tmp_path / "models" / "math").exists()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_unedited(example, example_dir, clean_cache, tmp_path):
    config = example_dir / example.name
    assert config.read_bytes() == example.read_bytes()
    out = tmp_path / "out"
    run_cli("merge", str(config), "-o", str(out), "-q", "--seed", "1")
    tensors = load_tensors(out)
    assert tensors, example.name
    assert all(torch.isfinite(t.float()).all() for t in tensors.values()), example.name
    made = "adapter_config.json" if "adapters" in yaml.safe_load(config.read_text()) else "config.json"
    assert (out / made).is_file() and (out / "moekit_config.yaml").is_file()
    if example.name.startswith("demo_"):
        assert not (tmp_path / "home" / ".cache").exists()
        recipe = (out / "moekit_config.yaml").read_text()
        assert "${MOEKIT_CACHE}/demo/models/smollm2-" in recipe  # the recipe stays portable


def test_only_a_leading_moekit_cache_is_expanded(tmp_path, monkeypatch):
    from moekit.paths import expand_path

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert expand_path("${MOEKIT_CACHE}/demo/m") == tmp_path / "c" / "demo" / "m"
    assert expand_path("$MOEKIT_CACHE/m") == tmp_path / "c" / "m"
    assert expand_path("$MOEKIT_CACHEX/m") == Path("$MOEKIT_CACHEX/m")
    assert expand_path("models/${MOEKIT_CACHE}") == Path("models/${MOEKIT_CACHE}")
    assert expand_path("$HOME/m") == Path("$HOME/m")
    monkeypatch.delenv("MOEKIT_CACHE")
    assert expand_path("${MOEKIT_CACHE}/m") == tmp_path / "h" / ".cache" / "moekit" / "m"
