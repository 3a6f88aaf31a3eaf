"""Stand-in for mergekit's `tests/common.py` (not shipped in its source distribution), used by
bench/mergekit_suite.py to harvest the configs of mergekit 0.1.5's own test suite.

It runs inside the mergekit venv, imported as `tests.common` by mergekit's test modules. The model makers build
tiny random checkpoints of the architecture each test names; `run_and_check_merge` records the config (as the
YAML mergekit-yaml reads) instead of merging, so each test contributes the configs it would have merged. Tests
that expect mergekit to refuse a config then fail here; the bench runs every recorded config through
mergekit-yaml itself and reports what mergekit refuses.
"""

from __future__ import annotations

import json
import os
import zlib

import torch
import transformers


def run_and_check_merge(config, *args, **kwargs) -> None:
    record = {"test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], "yaml": config.to_yaml()}
    with open(os.environ["MOEKIT_SUITE_CAPTURE"], "a") as f:
        f.write(json.dumps(record) + "\n")


def _save(model, path) -> str:
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def make_picollama(path, vocab_size: int = 64) -> str:
    torch.manual_seed(zlib.crc32(str(path).encode()))
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=16,
        num_hidden_layers=2,
    )
    return _save(transformers.LlamaForCausalLM(cfg), path)


def make_picogranite(path, vocab_size: int = 64) -> str:
    torch.manual_seed(zlib.crc32(str(path).encode()))
    cfg = transformers.GraniteConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
    )
    return _save(transformers.GraniteForCausalLM(cfg), path)


def make_gpt2size(path) -> str:
    """A GPT-2 of the architecture the test names, shrunk (the test's 124M parameters add nothing here)."""
    torch.manual_seed(zlib.crc32(str(path).encode()))
    cfg = transformers.GPT2Config(n_ctx=128, n_embd=64, n_head=4, n_layer=12, n_positions=128, vocab_size=512)
    return _save(transformers.GPT2LMHeadModel(cfg), path)


def make_picoLlaVa(path) -> str:  # noqa: N802 - the name mergekit's tests import
    torch.manual_seed(zlib.crc32(str(path).encode()))
    vision = transformers.CLIPVisionConfig(
        image_size=32,
        patch_size=4,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_size=64,
        intermediate_size=128,
    )
    text = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2
    )
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
    return _save(transformers.LlavaForConditionalGeneration(config=cfg), path)
