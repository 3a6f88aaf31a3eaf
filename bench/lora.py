"""LoRA in and out, side by side with mergekit 0.1.5: `extract-lora` and applying `base+lora` in a merge.

    python bench/lora.py            # bf16 models of 8 and 16 layers (hidden 1024), rank 16
    python bench/lora.py --quick    # small models, to check the script end to end

For each model size: `moekit extract-lora` and `mergekit-extract-lora` on the same base and fine-tune (wall time
and peak RSS, medians of --runs child processes), the largest difference between the two tools' updates B·A,
and a passthrough merge of `base+adapter` (moekit applies the update per tensor as it streams; mergekit merges
the adapter with PEFT into a full model in its LoRA cache first). The larger models have twice the layers and
the same largest tensor, so a streaming tool's peak RSS should stay flat.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _compare import gb, median, table  # noqa: E402
from _models import QUICK, Shape, dir_bytes, make_family  # noqa: E402
from _peer import PEER_ENV, bench_dir, mergekit_venv, timed_run  # noqa: E402

from moekit.io.safetensors_reader import TensorReader, read_header  # noqa: E402

SMALL = Shape(vocab=8192, hidden=1024, intermediate=2816, layers=8, heads=8, kv_heads=4)
RANK = 16


def moekit_extract(base: Path, ft: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "moekit", "extract-lora", "--base", str(base), "--model", str(ft)] + [
        "-o", str(out), "--rank", str(RANK), "--force", "-q"
    ]  # fmt: skip


def mergekit_extract(base: Path, ft: Path, out: Path) -> list[str]:
    return [str(mergekit_venv() / "mergekit-extract-lora"), "--base-model", str(base), "--model", str(ft)] + [
        "--out-path", str(out), "--max-rank", str(RANK)
    ]  # fmt: skip


def moekit_apply(cfg: Path, out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "moekit", "merge", str(cfg), "-o", str(out), "--force", "-q"]


def mergekit_apply(cfg: Path, out: Path, cache: Path) -> list[str]:
    return [str(mergekit_venv() / "mergekit-yaml"), str(cfg), str(out), "--lora-merge-cache", str(cache)]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(cmd, out: Path, runs: int, cache: Path | None = None) -> tuple[float, float, int]:
    """Medians of wall seconds, CPU seconds (user + system of the child tree) and peak RSS."""
    times, cpu, rss = [], [], []
    for _ in range(runs):
        shutil.rmtree(out, ignore_errors=True)
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)  # mergekit would reuse its merged copy otherwise
        before = _children_cpu()
        r = timed_run(cmd, PEER_ENV)
        cpu.append(_children_cpu() - before)
        times.append(r.seconds)
        rss.append(r.peak_rss_bytes)
    return median(times), median(cpu), int(median(rss))


def largest_update_difference(a: Path, b: Path) -> float:
    """max |B·A (moekit) - B·A (mergekit)| over the modules both adapters hold, in fp32."""
    ra = TensorReader(read_header(a / "adapter_model.safetensors"))
    rb = TensorReader(read_header(b / "adapter_model.safetensors"))
    worst = 0.0
    for name in ra.names():
        if name.endswith("lora_A.weight") and name in rb:
            bname = name.replace("lora_A", "lora_B")
            da = ra.read(bname).float() @ ra.read(name).float()
            db = rb.read(bname).float() @ rb.read(name).float()
            worst = max(worst, (da - db).abs().max().item())
    ra.close()
    rb.close()
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-mergekit", action="store_true", help="skip the mergekit runs")
    args = ap.parse_args()

    root = bench_dir()
    small = QUICK if args.quick else SMALL
    work = root / ("lora_quick" if args.quick else "lora")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, shape in (("1x", small), ("2x", dataclasses.replace(small, layers=2 * small.layers))):
        base, ft = make_family(root / "models", shape, n_finetunes=1)
        ours, peer = work / f"moekit-{label}", work / f"mergekit-{label}"
        ext = measure(moekit_extract(base, ft, ours), ours, args.runs)
        cfg = work / f"apply-{label}.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {"merge_method": "passthrough", "models": [{"model": f"{base}+{ours}"}], "dtype": "bfloat16"}
            )
        )
        cache = work / "lora-cache"
        app = measure(moekit_apply(cfg, work / "applied", cache), work / "applied", args.runs)
        mk_ext = mk_app = None
        diff = "-"
        if not args.no_mergekit:
            mk_ext = measure(mergekit_extract(base, ft, peer), peer, args.runs)
            diff = f"{largest_update_difference(ours, peer):.1e}"
            mk_app = measure(
                mergekit_apply(cfg, work / "applied-mk", cache), work / "applied-mk", args.runs, cache
            )
        size = f"{shape.layers} layers, {dir_bytes(base) / 1e6:.0f} MB"
        for what, mine, theirs in (("extract-lora", ext, mk_ext), ("base+lora merge", app, mk_app)):
            rows.append([
                size, what, f"{mine[0]:.1f}", f"{theirs[0]:.1f}" if theirs else "-", f"{mine[1]:.1f}",
                f"{theirs[1]:.1f}" if theirs else "-", f"{theirs[1] / mine[1]:.2f}x" if theirs else "-",
                gb(mine[2]), gb(theirs[2]) if theirs else "-", diff if what == "extract-lora" else "-",
            ])  # fmt: skip
        print(f"  {label}: done", flush=True)
    header = [
        "model (bf16)",
        "task",
        "moekit s",
        "mergekit s",
        "speed-up",
        "moekit RSS",
        "mergekit RSS",
        "max |dBA|",
    ]
    print(
        f"\nrank {RANK}, CPU, medians of {args.runs} runs; CPU s = user + system time of the tool's process"
    )
    print("(wall time is only meaningful on an idle machine; CPU time holds up on a shared one)\n")
    print(table(header, rows))


if __name__ == "__main__":
    main()
