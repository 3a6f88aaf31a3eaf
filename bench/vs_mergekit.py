"""moekit vs mergekit 0.1.5 on the same locally made models and the same configs: numbers, wall time, peak RSS.

    python bench/vs_mergekit.py            # 3 x ~325 MB bf16 Llama models (the anchor measurement's size)
    python bench/vs_mergekit.py --quick    # 3 x ~15 MB models, to check the script end to end

Each tool runs as a child process (`/usr/bin/time -v` measures wall time and peak RSS), the two alternating so
that load from other processes hits both alike; medians of --runs runs each. Both use their default options
except the seed (the same for both). The max abs diff compares the two outputs in fp32, tensor by tensor.
mergekit lives in its own venv under the bench cache (see _peer.py), made on the first run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _compare import gb, max_abs_diff, median, table  # noqa: E402
from _models import ANCHOR, QUICK, dir_bytes, make_family  # noqa: E402
from _peer import PEER_ENV, bench_dir, mergekit_cmd, mergekit_venv, moekit_cmd, timed_run  # noqa: E402

# Targets from the issue: moekit's wall time and peak RSS as a fraction of mergekit's.
TIME_TARGET = {"linear": 0.7, "task_arithmetic": 0.7, "slerp": 0.7, "ties": 0.3, "dare_ties": 0.3}
RSS_TARGET = 0.5
PARITY_TOL = 1e-5


def configs(base: Path, ft1: Path, ft2: Path) -> dict[str, dict]:
    """The merges compared. linear and slerp keep the inputs' bf16 (both tools compute them in fp32 and round
    once); the task-vector methods set `dtype: float32`, as mergekit otherwise computes them in bf16."""
    b, m1, m2 = str(base), str(ft1), str(ft2)
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": b, "parameters": {"weight": 0.2}},
                {"model": m1, "parameters": {"weight": 0.5}},
                {"model": m2, "parameters": {"weight": 0.3}},
            ],
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": b,
            "models": [
                {"model": m1, "parameters": {"weight": 0.6}},
                {"model": m2, "parameters": {"weight": 0.4}},
            ],
            "dtype": "float32",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": b,
            "models": [
                {"model": m1, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": m2, "parameters": {"weight": 0.4, "density": 0.7}},
            ],
            "dtype": "float32",
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": b,
            "models": [
                {"model": m1, "parameters": {"weight": 0.6, "density": 0.6}},
                {"model": m2, "parameters": {"weight": 0.4, "density": 0.5}},
            ],
            "dtype": "float32",
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": b,
            "models": [{"model": b}, {"model": m1}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                    {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
                    {"value": 0.5},
                ]
            },
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models (~15 MB each)")
    ap.add_argument("--runs", type=int, default=3, help="runs per tool and method (median reported)")
    ap.add_argument("--methods", default=",".join(TIME_TARGET), help="comma-separated subset")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    root = bench_dir()
    shape = QUICK if args.quick else ANCHOR
    base, ft1, ft2 = make_family(root / "models", shape)
    mergekit_venv()
    work = root / ("vs_mergekit_quick" if args.quick else "vs_mergekit")
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"models: 3 x {dir_bytes(base) / 1e6:.0f} MB bf16 Llama ({shape.params / 1e6:.0f}M params, {shape.layers} layers)"
    )

    rows, problems = [], []
    all_cfgs = configs(base, ft1, ft2)
    for method in args.methods.split(","):
        cfg_path = work / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(all_cfgs[method], sort_keys=False))
        outs = {"moekit": work / f"{method}-moekit", "mergekit": work / f"{method}-mergekit"}
        cmds = {
            "moekit": moekit_cmd(cfg_path, outs["moekit"], args.seed),
            "mergekit": mergekit_cmd(cfg_path, outs["mergekit"], args.seed),
        }
        results: dict[str, list] = {"moekit": [], "mergekit": []}
        try:
            for _ in range(args.runs):
                for tool in ("moekit", "mergekit"):
                    shutil.rmtree(outs[tool], ignore_errors=True)
                    results[tool].append(timed_run(cmds[tool], PEER_ENV))
        except RuntimeError as e:
            reason = next((ln for ln in str(e).splitlines()[1:] if ln.strip()), "failed")
            rows.append([method, f"FAILED: {reason[:100]}"] + ["-"] * 6)
            problems.append(f"{method}: {e}")
            continue
        diff, where = max_abs_diff(outs["moekit"], outs["mergekit"])
        t_me = median([r.seconds for r in results["moekit"]])
        t_mk = median([r.seconds for r in results["mergekit"]])
        r_me = median([r.peak_rss_bytes for r in results["moekit"]])
        r_mk = median([r.peak_rss_bytes for r in results["mergekit"]])
        t_ratio, r_ratio = t_me / t_mk, r_me / r_mk
        ok_t, ok_r = t_ratio <= TIME_TARGET[method], r_ratio <= RSS_TARGET
        rows.append([
            method, f"{diff:.2e}" + ("" if diff <= PARITY_TOL else f" ({where})"), f"{t_me:.2f}", f"{t_mk:.2f}",
            f"{t_ratio:.2f} ({'ok' if ok_t else 'MISS'} <= {TIME_TARGET[method]})", gb(r_me), gb(r_mk),
            f"{r_ratio:.2f} ({'ok' if ok_r else 'MISS'} <= {RSS_TARGET})",
        ])  # fmt: skip
        if diff > PARITY_TOL:
            problems.append(f"{method}: max abs diff {diff:.3e} at {where}")
        # Each row as it completes, so a long run that is cut short still shows what it measured.
        print("  " + " | ".join(rows[-1]), flush=True)
        for d in outs.values():
            shutil.rmtree(d, ignore_errors=True)

    header = [
        "method",
        "max abs diff (fp32)",
        "moekit s",
        "mergekit s",
        "time ratio",
        "moekit RSS",
        "mergekit RSS",
        "RSS ratio",
    ]
    print(f"\nmedians of {args.runs} runs each, seed {args.seed}, configs in {work}\n")
    print(table(header, rows))
    for p in problems:
        print(f"parity above {PARITY_TOL:g}: {p}")


if __name__ == "__main__":
    main()
