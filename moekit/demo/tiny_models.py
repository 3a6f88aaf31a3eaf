"""Small, locally made models for tests, benchmarks and the offline demo: a random Llama-family base, a locally
trained tokenizer, and "fine-tunes" that are the base plus seeded random deltas. Deterministic for a given seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TOKENIZER_TEXT = (
    "def merge(models, weights): return sum(w * m for w, m in zip(weights, models))\n"
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.\n"
    "The quick brown fox jumps over the lazy dog. Mixture of experts routes every token to a few experts.\n"
    "import torch\nfor layer in range(32): print(layer, 'hello world')\n"
)


def make_tokenizer(out: Path, vocab_size: int = 256) -> None:
    """A byte-level BPE tokenizer trained on a few lines of text, saved in HF format (tokenizer.json & co)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_TEXT.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out))


def llama_config(
    vocab_size: int = 256,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 4,
    model_type: str = "llama",
    tie_word_embeddings: bool = False,
) -> dict:
    cfg = {
        "architectures": [
            {
                "llama": "LlamaForCausalLM",
                "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM",
            }[model_type]
        ],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden_size // 4,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "torch_dtype": "float32",
    }
    if model_type == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


def make_base(
    out: Path, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer: bool = True, **cfg_kwargs
) -> Path:
    """A random-weight model of the given family, saved with save_pretrained (safetensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(**cfg_kwargs)
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # The default init (std 0.02, norms at 1) makes near-identical logits everywhere; spread them a little.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
    model.to(dtype).save_pretrained(str(out))
    if tokenizer:
        make_tokenizer(out, vocab_size=cfg["vocab_size"])
    return out


def make_finetune(
    base: Path, out: Path, seed: int, scale: float = 0.01, dtype: torch.dtype | None = None
) -> Path:
    """base + N(0, scale²) on every tensor (norms included), with the base's config and tokenizer."""
    import shutil

    from safetensors.torch import load_file, save_file

    base, out = Path(base), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    files = sorted(base.glob("*.safetensors"))
    for f in files:
        tensors = load_file(str(f))
        tuned = {}
        for name in sorted(tensors):
            t = tensors[name]
            noise = torch.randn(t.shape, generator=g) * scale
            tuned[name] = (t.float() + noise).to(dtype or t.dtype).contiguous()
        save_file(tuned, str(out / f.name), metadata={"format": "pt"})
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copyfile(f, out / f.name)
    if dtype is not None:
        cfg = json.loads((out / "config.json").read_text())
        for k in ("torch_dtype", "dtype"):
            if k in cfg:
                cfg[k] = str(dtype).removeprefix("torch.")
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
