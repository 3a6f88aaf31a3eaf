"""Locally made Llama-architecture models for the benches: a random base and "fine-tunes" (base + seeded noise).

Tensors are drawn one at a time from a seeded generator in name order and written straight to safetensors, so a
~300 MB model takes a couple of seconds and the same arguments always give the same bytes. Models are cached
under the bench directory by their shape, dtype and seed.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from moekit.demo.tiny_models import make_tokenizer

BASE_STD = 0.02
DELTA_STD = (
    0.01  # fine-tunes differ enough that slerp's angle is real (|cos| ~ 0.8, far from the lerp fallback)
)


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab, h),
            "model.norm.weight": (h,),
            "lm_head.weight": (self.vocab, h),
        }
        for n in range(self.layers):
            p = f"model.layers.{n}."
            shapes |= {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        return shapes

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes().values())

    @property
    def largest_tensor_numel(self) -> int:
        return max(math.prod(s) for s in self.tensor_shapes().values())

    def config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 2,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }


# The anchor measurement's size: 30 layers of a SmolLM-like shape, ~163M parameters, ~325 MB in bf16.
ANCHOR = Shape(vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3)
QUICK = Shape(vocab=8192, hidden=256, intermediate=512, layers=6, heads=4, kv_heads=2)
TINY = Shape(vocab=512, hidden=64, intermediate=96, layers=4, heads=4, kv_heads=2)


def _draw(shape: Shape, seed: int, base: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in sorted(shape.tensor_shapes().items()):
        if base is None:
            t = torch.randn(s, generator=g) * BASE_STD
            if "norm" in name:
                t += 1.0
        else:
            t = base[name] + torch.randn(s, generator=g) * DELTA_STD
        out[name] = t
    return out


def _write(path: Path, shape: Shape, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.to(dtype).contiguous() for k, v in tensors.items()},
        str(tmp / "model.safetensors"),
        {"format": "pt"},
    )
    (tmp / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    (tmp / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2})
    )
    make_tokenizer(tmp, vocab_size=min(shape.vocab, 512))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def make_family(
    root: Path, shape: Shape, dtype: torch.dtype = torch.bfloat16, n_finetunes: int = 2, seed: int = 0
) -> list[Path]:
    """[base, ft1, ..., ftN] under `root`, made once and reused (keyed by shape, dtype and seed)."""
    key = f"{shape.vocab}v{shape.hidden}h{shape.intermediate}i{shape.layers}l-{str(dtype).removeprefix('torch.')}-s{seed}"
    d = Path(root) / key
    names = ["base"] + [f"ft{i + 1}" for i in range(n_finetunes)]
    paths = [d / n for n in names]
    if all((p / "model.safetensors").is_file() for p in paths):
        return paths
    d.mkdir(parents=True, exist_ok=True)
    (d / "shape.json").write_text(json.dumps(asdict(shape)))
    base = _draw(shape, seed, None)
    _write(paths[0], shape, base, dtype)
    # Fine-tunes start from the base as stored (rounded to `dtype`), as a real fine-tune would.
    base = {k: v.to(dtype).float() for k, v in base.items()}
    for i, p in enumerate(paths[1:]):
        _write(p, shape, _draw(shape, seed + 1000 * (i + 1), base), dtype)
    return paths


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def add_tokens(src: Path, out: Path, tokens: list[str], seed: int, reserve: int = 0) -> Path:
    """A copy of model `src` whose tokenizer has `tokens` added, with embed_tokens/lm_head grown by random rows to
    cover them plus `reserve` unused rows (as hub models reserve rows past their tokenizer)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.add_tokens(tokens)
    tok.save_pretrained(str(out))
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(out / "model.safetensors"))
    rows = max(len(tok) + reserve, tensors["model.embed_tokens.weight"].shape[0])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t = tensors[name]
        extra = torch.randn(rows - t.shape[0], t.shape[1], generator=g) * 0.5
        tensors[name] = torch.cat([t, extra.to(t.dtype)]).contiguous()
    save_file(tensors, str(out / "model.safetensors"), {"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] = rows
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def make_vocab_family(root: Path, family: list[Path]) -> list[Path]:
    """Models whose tokenizers differ, from a [base, ft1, ft2, ...] family: base + "<x>" (with reserved rows),
    ft1 + "<x>", "<tool>", "alpha", and ft2 + "<tool>", "gamma" (no "<x>")."""
    d = Path(root) / (family[0].parent.name + "-vocab")
    paths = [d / n for n in ("base", "tool_a", "tool_b")]
    if all((p / "model.safetensors").is_file() for p in paths):
        return paths
    add_tokens(family[0], paths[0], ["<x>"], seed=1, reserve=7)
    add_tokens(family[1], paths[1], ["<x>", "<tool>", "alpha"], seed=2)
    add_tokens(family[2], paths[2], ["<tool>", "gamma"], seed=3)
    return paths
