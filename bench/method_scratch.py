"""The working memory of each merge method, measured, against the figures moekit/merging/method_table.py declares
(which the dry run's memory estimate uses).

    python bench/method_scratch.py [--size 2048] [--methods ties,linear]

For each method and n = its fewest models up to 3 (besides the base), one fresh process allocates the inputs
(size x size float32, random), resets its peak RSS (Linux: /proc/self/clear_refs), calls the method once and
reports the peak RSS above the inputs, in units of one input tensor. The table gives that and the declared
`fixed + per_model * n`. Linux only (it reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = r"""
import gc, re, sys, torch
from moekit.allocator import return_freed_memory_promptly
return_freed_memory_promptly()  # as a merge runs
from moekit.merging import methods  # noqa: F401
from moekit.merging.registry import METHODS
from moekit.merging.methods.sparsify import Uniforms

name, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
method = METHODS[name]
shape = (size, size)
overrides = {"t": 0.3 if name == "slerp" else 1e-3, "density": 0.5, "weight": 0.4}
params = {}
for p in method.params:
    v = overrides.get(p.name, None if p.required else p.default)
    params[p.py_name] = [v] * n if p.per_model else v
g = torch.Generator().manual_seed(0)
base = torch.randn(shape, generator=g) if method.base != "ignored" else None
tensors = [torch.randn(shape, generator=g) * 0.01 + (base if base is not None else 0) for _ in range(n)]
if method.draws is not None:
    params["rng"] = Uniforms(torch.Generator().manual_seed(1), method.draws(params, shape))
elif method.random:
    params["rng"] = torch.Generator().manual_seed(1)
gc.collect()

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

open("/proc/self/clear_refs", "w").write("5")  # the peak RSS (VmHWM) starts again from the current RSS
before = status("VmRSS")
out = method.fn(tensors, base, **params)
print((status("VmHWM") - before) / (size * size * 4))
"""


def measure(name: str, n: int, size: int) -> float:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(n), str(size)], capture_output=True, text=True, check=True
    )
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--methods", default="", help="comma-separated; default: every method")
    args = parser.parse_args()
    from moekit.merging import methods  # noqa: F401
    from moekit.merging.method_table import METHOD_FACTS
    from moekit.merging.registry import METHODS

    names = args.methods.split(",") if args.methods else sorted(METHODS)
    print(
        f"working memory per call, in float32 copies of one {args.size}x{args.size} input (output included)\n"
    )
    print("| method | n | measured | declared | declared / measured |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        method = METHODS[name]
        fixed, per_model = METHOD_FACTS[name].scratch
        for n in range(method.min_models, min(method.max_models or 3, 3) + 1):
            got = measure(name, n, args.size)
            declared = fixed + per_model * n
            ratio = f"{declared / got:.2f}" if got > 0.05 else "-"
            print(f"| {name} | {n} | {got:.2f} | {declared:.2f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
