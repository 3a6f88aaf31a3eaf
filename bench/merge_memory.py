"""Streaming memory: peak RSS of `moekit merge` (linear, 3 models) at two model sizes, and mergekit 0.1.5's.

    python bench/merge_memory.py           # 3 x ~325 MB bf16 models, then 3 x ~650 MB (twice the layers)
    python bench/merge_memory.py --quick   # small models, to check the script end to end

The larger models have twice the layers of the smaller ones and the same largest tensor (the embedding), so a
streaming merge should need about the same peak memory for both: its peak grows with the largest tensor, not with
the model. mergekit runs on the smaller merge for the ratio. Peak RSS comes from `/usr/bin/time -v` on the child.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _compare import gb, median, table  # noqa: E402
from _models import ANCHOR, QUICK, dir_bytes, make_family  # noqa: E402
from _peer import PEER_ENV, bench_dir, mergekit_cmd, moekit_cmd, timed_run  # noqa: E402


def linear_config(paths: list[Path]) -> dict:
    weights = (0.2, 0.5, 0.3)
    return {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, weights)],
    }


def peak_rss(cmd_for, cfg: Path, out: Path, runs: int) -> int:
    values = []
    for _ in range(runs):
        shutil.rmtree(out, ignore_errors=True)
        values.append(timed_run(cmd_for(cfg, out, 0), PEER_ENV).peak_rss_bytes)
    shutil.rmtree(out, ignore_errors=True)
    return int(median(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-mergekit", action="store_true", help="skip the mergekit run")
    args = ap.parse_args()

    root = bench_dir()
    small = QUICK if args.quick else ANCHOR
    large = dataclasses.replace(small, layers=2 * small.layers)
    work = root / ("merge_memory_quick" if args.quick else "merge_memory")
    work.mkdir(parents=True, exist_ok=True)
    baseline = timed_run(
        [sys.executable, "-c", "import moekit.merging.api, moekit.merging.methods"], PEER_ENV
    )

    rows, rss = [], {}
    for label, shape in (("1x", small), ("2x", large)):
        paths = make_family(root / "models", shape)
        cfg = work / f"linear-{label}.yaml"
        cfg.write_text(yaml.safe_dump(linear_config(paths), sort_keys=False))
        rss[label] = peak_rss(moekit_cmd, cfg, work / f"out-{label}", args.runs)
        mk = None
        if label == "1x" and not args.no_mergekit:
            mk = peak_rss(mergekit_cmd, cfg, work / "out-mergekit", args.runs)
        largest = shape.largest_tensor_numel
        rows.append([
            f"{label}: {shape.layers} layers", f"3 x {dir_bytes(paths[0]) / 1e6:.0f} MB",
            f"{largest * 2 / 1e6:.0f} MB bf16 / {largest * 4 / 1e6:.0f} MB fp32", gb(rss[label]),
            gb(mk) if mk else "-", f"{rss[label] / mk:.2f}" if mk else "-",
        ])  # fmt: skip
        print(f"  {label}: done", flush=True)

    header = ["models", "inputs", "largest tensor", "moekit peak RSS", "mergekit peak RSS", "ratio"]
    print(f"\nlinear merge of 3 models; medians of {args.runs} runs\n")
    print(table(header, rows))
    grow = rss["2x"] - rss["1x"]
    model_grow = dir_bytes(make_family(root / "models", large)[0]) - dir_bytes(
        make_family(root / "models", small)[0]
    )
    print(
        f"\npeak RSS grows by {grow / 1e6:+.0f} MB when each input grows by {model_grow / 1e6:.0f} MB "
        f"(largest tensor: {small.largest_tensor_numel * 4 / 1e6:.0f} MB in fp32); "
        f"importing moekit alone takes {gb(baseline.peak_rss_bytes)}"
    )


if __name__ == "__main__":
    main()
