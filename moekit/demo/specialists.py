"""Cheap, real specialists: a short, seeded CPU fine-tune of a causal LM's MLP weights on one domain.

Only the MLP projections (gate_proj, up_proj, down_proj of every layer) train; embeddings, attention and norms
stay bit-identical to the base. So the specialists differ from the base exactly where a clown-MoE puts its
experts, and a task vector (specialist - base) is zero everywhere else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit import transformers_io
from moekit.demo.cache import atomic_dir, cache_key, cache_root
from moekit.demo.domains import DomainWindows
from moekit.errors import UserError

MLP_WEIGHT = re.compile(r"\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
# Files that describe the model rather than hold its weights: copied verbatim from the base, so a specialist
# loads exactly like its base (same config keys, same tokenizer) in every transformers version.
_BASE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class Specialist:
    """A fine-tuned checkpoint and how it was made (`losses` per step, `train_seconds` of the loop alone)."""

    path: Path
    losses: tuple[float, ...]
    train_seconds: float
    steps: int
    cached: bool


@contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seed torch, force deterministic kernels and run on `threads` threads; restore the previous settings after."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


def batch_order(num_windows: int, count: int, seed: int) -> torch.Tensor:
    """`count` window indices: seeded permutations of range(num_windows), concatenated (each epoch reshuffled)."""
    generator = torch.Generator().manual_seed(seed)
    epochs = -(-count // num_windows)
    return torch.cat([torch.randperm(num_windows, generator=generator) for _ in range(epochs)])[:count]


def finetune_mlp(
    model: torch.nn.Module,
    windows: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    threads: int | None = None,
) -> list[float]:
    """Train `model`'s MLP weights in place with AdamW (no weight decay) on `windows`; return the loss of each step.

    Each step's loss is the mean next-token cross-entropy of its batch, measured before that step's update.
    All other parameters have requires_grad turned off and do not change. `on_step(step, loss)` is called after
    each step (for progress display). `threads` defaults to every core; CPU kernels split their sums by thread,
    so results are reproducible for a given thread count.
    """
    names = [name for name, _ in model.named_parameters() if MLP_WEIGHT.search(name)]
    if not names:
        raise UserError(
            f"{type(model).__name__} has no parameters named *.mlp.{{gate,up,down}}_proj.weight to train"
        )
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    trainable = [param for name, param in model.named_parameters() if name in names]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    order = batch_order(len(windows), steps * batch_size, seed)
    losses = []
    model.train()
    with deterministic(seed, threads or os.cpu_count() or 1):
        for step in range(steps):
            batch = windows[order[step * batch_size : (step + 1) * batch_size]]
            # transformers shifts the labels inside the loss, so the labels are the inputs themselves.
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, losses[-1])
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    return losses


def specialist(
    base_dir: str | Path,
    domain: DomainWindows,
    steps: int = 30,
    lr: float = 3e-4,
    batch_size: int = 4,
    seed: int = 0,
    cache: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    threads: int | None = None,
) -> Specialist:
    """The base fine-tuned on `domain.train` (see `finetune_mlp`), saved as a checkpoint in the base's dtype.

    Cached under a key of the base checkpoint, the training windows and every hyperparameter; a cached
    specialist is returned with its recorded losses and time. `train_log.json` in the checkpoint records them.
    `on_step` and `threads` are as in `finetune_mlp`; the thread count is part of the key (see there).
    """
    base_dir = Path(base_dir)
    threads = threads or os.cpu_count() or 1
    weights = sorted(base_dir.glob("*.safetensors"))
    if not weights:
        raise UserError(f"{base_dir} holds no *.safetensors weights: pass a converted checkpoint directory")
    key = cache_key(
        base=str(base_dir.resolve()),
        base_weights=[(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights],
        windows=cache_key(data=domain.train.numpy().tobytes().hex()),
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        threads=threads,
    )
    out = (cache or cache_root()) / "specialists" / f"{domain.name}-{key}"
    if not (out / "train_log.json").exists():
        model = transformers_io.load_model(base_dir, dtype=torch.float32)
        start = time.perf_counter()
        losses = finetune_mlp(model, domain.train, steps, lr, batch_size, seed, on_step, threads)
        seconds = time.perf_counter() - start
        with atomic_dir(out) as tmp:
            model.to(_checkpoint_dtype(base_dir)).save_pretrained(tmp)
            for name in _BASE_FILES:
                if (base_dir / name).exists():
                    shutil.copy2(base_dir / name, tmp / name)
            log = {
                "domain": domain.name,
                "base": str(base_dir),
                "steps": steps,
                "lr": lr,
                "batch_size": batch_size,
                "seq_len": domain.train.shape[1],
                "seed": seed,
                "threads": threads,
                "losses": losses,
                "train_seconds": seconds,
                "train_files": list(domain.train_files),
            }
            (tmp / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
        return Specialist(out, tuple(losses), seconds, steps, cached=False)
    log = json.loads((out / "train_log.json").read_text())
    return Specialist(out, tuple(log["losses"]), log["train_seconds"], log["steps"], cached=True)


def _checkpoint_dtype(checkpoint: Path) -> torch.dtype:
    """The dtype a checkpoint's config declares (`dtype`, or `torch_dtype` in transformers 4), else float32."""
    config = json.loads((checkpoint / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)
