"""Shared test set-up.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, at collection time,
whenever no CUDA device is present: the Triton kernels then run on the CPU interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Under pytest-xdist every worker owns one core: a second torch thread per worker only oversubscribes the CPU
# (tiny grouped GEMMs were measured 1000x slower with 2 threads on a busy 2-core box).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> dict[str, Path]:
    """A random 4-layer Llama base with a locally trained tokenizer, and two seeded 'fine-tunes' of it."""
    from moekit.demo.tiny_models import make_base, make_finetune

    root = tmp_path_factory.mktemp("tiny_llama")
    base = make_base(root / "base", seed=0)
    return {
        "base": base,
        "ft1": make_finetune(base, root / "ft1", seed=1),
        "ft2": make_finetune(base, root / "ft2", seed=2),
        "ft3": make_finetune(base, root / "ft3", seed=3),
    }


def load_tensors(model_dir: Path) -> dict:
    """Every tensor of a checkpoint directory, via the safetensors library (independent of moekit's reader)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
