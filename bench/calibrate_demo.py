"""Router calibration on the README demo's SmolLM2 clown-MoE: routing and perplexity before and after.

    python -m moekit.demo                     # once: the specialists and the clown-MoE under $MOEKIT_CACHE/demo
    python bench/calibrate_demo.py            # then this

Training text is the demo's own training windows of each domain, decoded; held-out text is the file the demo
scored route-stats on ($MOEKIT_CACHE/demo/heldout_{code,legal}.txt), so "before" is the README's routing row.
It runs `moekit calibrate-router` as a user would and prints its before/after table, the wall time and the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from moekit.demo.cache import cache_root
from moekit.demo.domains import domain_windows

DOMAINS = ("code", "legal")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=None, help="the demo's folder (default: $MOEKIT_CACHE/demo)")
    ap.add_argument("-o", "--out", type=Path, default=None, help="default: DEMO/merges/clown_moe_calibrated")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--objective", default="both")
    ap.add_argument("--label-coef", type=float, default=0.3)
    ap.add_argument(
        "--window", type=int, default=256, help="route-stats' default, so 'before' is the README's"
    )
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more calibrate-router options")
    args = ap.parse_args()

    demo = args.demo or cache_root() / "demo"
    moe = demo / "merges" / "clown_moe"
    if not (moe / "config.json").is_file():
        sys.exit(f"{moe} is missing: run `python -m moekit.demo` first")
    base = (demo / "models" / "smollm2-base").resolve()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    cmd = [sys.executable, "-m", "moekit", "calibrate-router", str(moe), "--force"]
    for d in DOMAINS:
        train = demo / f"train_{d}.txt"
        windows = domain_windows(d, base).train
        train.write_text("\n\n".join(tokenizer.decode(w) for w in windows) + "\n", encoding="utf-8")
        print(f"{d}: {len(windows)} training windows -> {train}")
        cmd += ["--data", f"{d}={train}", "--heldout", f"{d}={demo / f'heldout_{d}.txt'}"]
    out = args.out or demo / "merges" / "clown_moe_calibrated"
    cmd += ["-o", str(out), "--steps", str(args.steps), "--window", str(args.window)]
    cmd += ["--objective", args.objective, "--label-coef", str(args.label_coef), *args.extra]
    print("$ moekit " + " ".join(cmd[3:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"wall time {time.perf_counter() - t0:.0f} s on {cpu_name()}, {len(os.sched_getaffinity(0))} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
