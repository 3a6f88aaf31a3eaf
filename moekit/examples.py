"""`moekit example-models DIR`: the small local models that the configs in merge_configs/ name.

The example configs name their models relative to their own folder (./models/base, models/qwen2-code,
./loras/math, ...). This writes exactly those into DIR/models and DIR/loras, so that with DIR = merge_configs
every example runs as shipped. They are stand-ins, not useful models: random 4-layer Llama and Qwen2 bases with
a locally trained tokenizer, "fine-tunes" that are a base plus seeded noise, and rank-4 LoRAs of the Llama base
extracted from three of them. Deterministic: the same files on every run (the test suite's tiny models).

The demo_*.yaml configs need the demo's SmolLM2 models instead, which `make demo` makes under $MOEKIT_CACHE.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import UserError

MARKER_NAME = "moekit_example.json"  # marks a directory this command made, so a rerun may keep or replace it
SHAPE = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 4,
}  # passthrough takes 4


@dataclass(frozen=True)
class ExampleModel:
    """One directory to make: a random base (seed), a fine-tune of a base (base, seed), or a LoRA (base, tuned)."""

    path: str  # relative to DIR
    model_type: str = "llama"
    seed: int = 0
    base: str | None = None
    lora_of: str | None = None  # the fine-tune whose difference from `base` the adapter holds


EXAMPLE_MODELS = (
    ExampleModel("models/base"),
    *(
        ExampleModel(f"models/{name}", seed=i, base="models/base")
        for i, name in enumerate(("math", "code", "chat", "legal"), 1)
    ),
    ExampleModel("models/qwen2-base", model_type="qwen2", seed=10),
    *(
        ExampleModel(f"models/qwen2-{name}", model_type="qwen2", seed=i, base="models/qwen2-base")
        for i, name in enumerate(("code", "math"), 11)
    ),
    *(
        ExampleModel(f"loras/{name}", base="models/base", lora_of=f"models/{name}")
        for name in ("math", "code", "chat")
    ),
)


def make_example_models(
    root: str | Path, *, force: bool = False, print_fn: Callable[[str], None] | None = None
) -> list[Path]:
    """Write every example model under `root`; return their directories. Directories this command made before
    are kept (they would come out the same) unless `force`; any other existing directory is refused."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(
            f"{root}: exists and is not a directory; give the folder that holds the example configs"
        )
    for spec in EXAMPLE_MODELS:
        target = root / spec.path
        if target.exists() and not (target / MARKER_NAME).is_file() and not force:
            raise UserError(
                f"{target}: exists and was not made by `moekit example-models`; move it away or pass --force"
            )
    made = []
    for spec in EXAMPLE_MODELS:
        target = root / spec.path
        if target.exists() and not force:
            note = "kept"
        else:
            _build(target, lambda staging, spec=spec: _make(spec, root, staging))
            note = "made"
        if print_fn is not None:
            print_fn(f"{note} {target}")
        made.append(target)
    return made


def _make(spec: ExampleModel, root: Path, out: Path) -> None:
    from transformers.utils import logging as hf_logging

    from moekit.demo.tiny_models import make_base, make_finetune

    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per tiny model would bury the listing

    if spec.lora_of is not None:
        from moekit.lora.extract import ExtractOptions, extract_lora

        only_lora = ExtractOptions(max_rank=4, exclude=("embed_tokens", "lm_head"), skip_undecomposable=True)
        extract_lora(str(root / spec.base), str(root / spec.lora_of), out, only_lora)
    elif spec.base is not None:
        make_finetune(root / spec.base, out, seed=spec.seed)
    else:
        make_base(out, seed=spec.seed, model_type=spec.model_type, **SHAPE)


def _build(target: Path, make: Callable[[Path], None]) -> None:
    """Make `target` in a staging sibling and rename it into place: it appears whole or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        make(staging)
        (staging / MARKER_NAME).write_text(json.dumps({"made_by": "moekit example-models"}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
