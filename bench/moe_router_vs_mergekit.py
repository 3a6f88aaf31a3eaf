"""Router weights and experts of moekit's MoE builds against mergekit-moe 0.1.5's, on the same config.

For each gate mode, both tools build a Mixtral from the same base and fine-tunes (mergekit-moe with
`--random-seed S --device cpu`, moekit with `--seed S`), and the script compares, per layer, the router matrices,
and the expert weights (mergekit 0.1.5 writes them fused, `experts.gate_up_proj`; moekit per expert).

mergekit runs the base in bfloat16 for hidden-state gates; moekit runs it in float32 by default. Both are shown:
moekit's default, and moekit with the base in bfloat16 as mergekit runs it (`gate_dtype`, Python API).

    python bench/moe_router_vs_mergekit.py            # QUICK shape (6 layers, hidden 256), ~1-2 min
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _compare import table  # noqa: E402
from _models import QUICK, make_family  # noqa: E402
from _peer import PEER_ENV, bench_dir, mergekit_venv  # noqa: E402

from moekit.io.safetensors_reader import TensorReader, checkpoint_infos  # noqa: E402
from moekit.moe.api import build_moe  # noqa: E402

MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")
SEED = 7
PROMPTS = [
    (["def fibonacci(n):", "import numpy as np\nx = np.zeros(3)"], ["Once upon a time"]),
    (["Permission is hereby granted, free of charge", "THE SOFTWARE IS PROVIDED AS IS"], []),
    (["The quick brown fox jumps over the lazy dog."], ["def merge(models):"]),
    (["for layer in range(32): print(layer, 'hello world')", "Mixture of experts routes every token"], []),
]


def config(paths: list[Path], mode: str) -> dict:
    base, ft1, ft2 = (str(p) for p in paths)
    experts = []
    for i, (pos, neg) in enumerate(PROMPTS):
        e = {"source_model": (ft1, ft2)[i % 2], "positive_prompts": pos}
        if neg:
            e["negative_prompts"] = neg
        experts.append(e)
    return {
        "base_model": base,
        "gate_mode": mode,
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": experts,
    }


def read_all(path: Path) -> dict[str, torch.Tensor]:
    reader = TensorReader(checkpoint_infos(path))
    try:
        return {n: reader.read(n).float() for n in reader.names()}
    finally:
        reader.close()


def routers(tensors: dict[str, torch.Tensor], layers: int) -> torch.Tensor:
    names = [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(layers)]
    if names[0] not in tensors:  # mergekit 0.1.5 writes transformers-5 names
        names = [f"model.layers.{i}.mlp.gate.weight" for i in range(layers)]
    return torch.stack([tensors[n] for n in names])


def expert_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], layers: int, n: int) -> str:
    """Max |moekit - mergekit| over every expert weight, after fusing moekit's per-expert tensors like transformers 5."""
    worst = 0.0
    for i in range(layers):
        p = f"model.layers.{i}.block_sparse_moe.experts."
        gate_up = torch.stack(
            [torch.cat([ours[f"{p}{e}.w1.weight"], ours[f"{p}{e}.w3.weight"]]) for e in range(n)]
        )
        down = torch.stack([ours[f"{p}{e}.w2.weight"] for e in range(n)])
        for mine, name in ((gate_up, "gate_up_proj"), (down, "down_proj")):
            other = theirs.get(f"model.layers.{i}.mlp.experts.{name}")
            if other is None:
                other = theirs.get(f"{p}{name}")
            if other is None or other.shape != mine.shape:
                return f"layout differs ({name}: {None if other is None else list(other.shape)} vs {list(mine.shape)})"
            worst = max(worst, (mine - other).abs().max().item())
    return f"{worst:.1e}"


def main() -> None:
    root = bench_dir() / "moe_router_vs_mergekit"
    root.mkdir(parents=True, exist_ok=True)
    paths = make_family(bench_dir() / "models", QUICK, torch.bfloat16, n_finetunes=2)
    mergekit_moe = mergekit_venv() / "mergekit-moe"
    rows = []
    for mode in MODES:
        cfg = config(paths, mode)
        cfg_path = root / f"{mode}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        theirs_dir = root / f"mergekit-{mode}"
        cmd = [
            str(mergekit_moe),
            str(cfg_path),
            str(theirs_dir),
            "--random-seed",
            str(SEED),
            "--device",
            "cpu",
        ]
        proc = subprocess.run(
            cmd, env={**PEER_ENV, **__import__("os").environ}, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"mergekit-moe failed on {mode}:\n{proc.stderr[-3000:]}")
        theirs = read_all(theirs_dir)
        ours = read_all(build_moe(cfg, cfg_path, root / f"moekit-{mode}", force=True, seed=SEED))
        r_theirs, r_ours = routers(theirs, QUICK.layers), routers(ours, QUICK.layers)
        diff = (r_ours - r_theirs).abs().max().item()
        cos = torch.nn.functional.cosine_similarity(r_ours, r_theirs, dim=-1).min().item()
        bf16 = "-"
        if mode in ("hidden", "hidden_avg"):
            same = read_all(
                build_moe(
                    cfg,
                    cfg_path,
                    root / f"moekit-{mode}-bf16",
                    force=True,
                    seed=SEED,
                    gate_dtype=torch.bfloat16,
                )
            )
            bf16 = f"{(routers(same, QUICK.layers) - r_theirs).abs().max().item():.1e}"
        rows.append(
            [mode, f"{diff:.1e}", f"{cos:.6f}", bf16, expert_diff(ours, theirs, QUICK.layers, len(PROMPTS))]
        )
    print(
        f"moekit vs mergekit-moe 0.1.5: Mixtral from {paths[0].parent.name}, {len(PROMPTS)} experts, seed {SEED}"
    )
    print(
        table(
            [
                "gate_mode",
                "router max|diff| (moekit fp32 gates)",
                "min cosine",
                "router max|diff| (moekit bf16 gates)",
                "experts max|diff|",
            ],
            rows,
        )
    )
    print(
        "router vectors are L2-normalised (entries ~0.06); bfloat16 has 8 bits of mantissa (relative step 2^-8 = 3.9e-3)."
    )


if __name__ == "__main__":
    main()
