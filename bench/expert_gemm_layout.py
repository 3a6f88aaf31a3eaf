"""Why the torch backend pads each expert's rows to a multiple of 8: one expert's gate/up product, both layouts.

For n rows of a Mixtral-like expert (H=1024, 2I=7168, fp32) it times `X @ Wᵀ` (row-major) and `W @ Xᵀ`
(weight-first, what moekit runs) interleaved, and prints medians per product and per row. On the 2-core AVX2
machine this was written on, weight-first is 1.3–1.4× faster than row-major when n is a multiple of 8 and
0.9–1.1× as fast when it is not.

    python bench/expert_gemm_layout.py                 # n = 240 .. 320
    python bench/expert_gemm_layout.py --rows 250 256  # chosen n
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

HIDDEN, INTER = 1024, 3584


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[240, 248, 250, 252, 256, 260, 264, 272, 288, 320])
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2 * INTER, HIDDEN, generator=g) * HIDDEN**-0.5
    inputs = {n: torch.randn(n, HIDDEN, generator=g) for n in args.rows}
    layouts = {
        "row-major X·Wᵀ": lambda x: torch.mm(x, weight.t()),
        "weight-first W·Xᵀ": lambda x: torch.mm(weight, x.t()),
    }
    times = {(name, n): [] for name in layouts for n in args.rows}
    for _ in range(args.reps):  # interleaved, so drift in the machine's speed hits every case alike
        for n, x in inputs.items():
            for name, product in layouts.items():
                start = time.perf_counter()
                product(x)
                times[(name, n)].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.reps}")
    print(
        f"{'n':>5} | {'X·Wᵀ ms':>8} {'µs/row':>7} | {'W·Xᵀ ms':>8} {'µs/row':>7} | row-major / weight-first"
    )
    for n in args.rows:
        a, b = (statistics.median(times[(name, n)]) for name in layouts)
        print(
            f"{n:>5} | {a * 1e3:8.1f} {a / n * 1e6:7.1f} | {b * 1e3:8.1f} {b / n * 1e6:7.1f} | {a / b:.2f}x"
        )


if __name__ == "__main__":
    main()
