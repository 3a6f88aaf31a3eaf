"""The offline demo on small locally made models (replaced by the SmolLM2 demo when it lands)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import moekit
from moekit.demo.tiny_models import make_base, make_finetune


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="moekit-demo-"))
    base = make_base(root / "base", seed=0)
    ft1, ft2 = make_finetune(base, root / "ft1", seed=1), make_finetune(base, root / "ft2", seed=2)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(ft1), "parameters": {"weight": 0.5}},
            {"model": str(ft2), "parameters": {"weight": 0.5}},
        ],
    }
    out = moekit.merge(cfg, root / "merged")
    print(f"merged into {out}")
