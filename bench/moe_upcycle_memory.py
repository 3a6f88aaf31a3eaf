"""Peak memory of an 8-expert sparse upcycle of a ~325 MB model: it streams, so it is not the model's size.

Runs `moekit merge` on an upcycle config in a child process under /usr/bin/time -v (peak RSS of the process), and
the same command with --dry-run as the baseline (same imports, headers read, plan made). The difference is what
the build itself holds; compare it with the input model, the output, and one expert's tensors in one layer.

    python bench/moe_upcycle_memory.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _compare import gb, table  # noqa: E402
from _models import ANCHOR, dir_bytes, make_family  # noqa: E402
from _peer import bench_dir, moekit_cmd, timed_run  # noqa: E402

NUM_EXPERTS = 8
RUNS = 1  # peak RSS barely varies between runs; each run writes 1.3 GB


def mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def main() -> None:
    root = bench_dir() / "moe_upcycle_memory"
    root.mkdir(parents=True, exist_ok=True)
    (base,) = make_family(bench_dir() / "models", ANCHOR, torch.bfloat16, n_finetunes=0)
    itemsize = 2
    shapes = ANCHOR.tensor_shapes()
    expert_set = (
        sum(
            math.prod(shapes[f"model.layers.0.mlp.{p}.weight"]) for p in ("gate_proj", "up_proj", "down_proj")
        )
        * itemsize
    )
    largest = ANCHOR.largest_tensor_numel * itemsize
    rows = []
    for noise in (0.0, 0.01):
        cfg = {
            "merge_method": "moe",
            "base_model": str(base),
            "gate_mode": "uniform_random",
            "experts_per_token": 2,
            "upcycle": {"num_experts": NUM_EXPERTS, "noise_scale": noise},
        }
        cfg_path = root / f"upcycle-noise{noise}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out = root / "out"
        # Baseline: the same command with --dry-run (same imports, headers read, plan made; nothing computed).
        baseline = timed_run([*moekit_cmd(cfg_path, out, seed=0), "--dry-run"]).peak_rss_bytes
        runs = [timed_run(moekit_cmd(cfg_path, out, seed=0)) for _ in range(RUNS)]
        peak = sorted(r.peak_rss_bytes for r in runs)[len(runs) // 2]
        secs = sorted(r.seconds for r in runs)[len(runs) // 2]
        rows.append(
            [
                f"noise_scale {noise}",
                gb(dir_bytes(out)),
                mb(baseline),
                mb(peak),
                mb(peak - baseline),
                f"{secs:.1f} s",
            ]
        )
    print(
        f"8-expert upcycle of a {gb(dir_bytes(base))} bf16 Llama ({ANCHOR.layers} layers, hidden {ANCHOR.hidden}, "
        f"intermediate {ANCHOR.intermediate}); median of {RUNS} run(s)"
    )
    print(f"one expert's tensors in one layer: {mb(expert_set)}; largest tensor (embedding): {mb(largest)}")
    print(
        table(["upcycle", "output", "peak RSS of --dry-run", "peak RSS", "peak RSS - dry run", "wall"], rows)
    )


if __name__ == "__main__":
    main()
