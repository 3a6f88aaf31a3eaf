"""Benchmark: one Mixtral-like MoE experts layer, moekit against transformers' experts backends, on the CPU.

H=1024, I=3584, E=8, k=2; tokens 1, 16, 128, 1024, 4096; fp32 and bf16 weights (bf16 activations with bf16
weights, as in a bf16 model). Every contender runs the same transformers `MixtralExperts` module with the same
routing, selected the way a model selects it (`config._experts_implementation`), so the comparison is apples to
apples. The floors are dense GEMM pairs with the same FLOPs (T·k rows through [H→2I] then [I→H]), one in fp32
and one in bf16: the bf16 floor shows what this CPU's bf16 GEMMs give (fast with AMX/AVX512-BF16, emulated and
slow without). The first line names the CPU, its bf16/fp16 units, and the path moekit takes for bf16 weights.

Contenders are interleaved within each repetition and medians are reported, since the machine may be shared.
`batched_mm` copies one [2I, H] + [H, I] weight pair per (token, expert) assignment; it is skipped where
that copy would exceed --batched-mm-limit-gb.

    python bench/moe_layer.py            # the full table (a few minutes on 2 cores)
    python bench/moe_layer.py --quick    # fewer token counts and repetitions
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import moekit  # noqa: F401  (registers experts_implementation="moekit")
from moekit.runtime.cpu_dtype import cpu_capability, native_low_precision
from moekit.runtime.routing import route

HIDDEN, INTER, EXPERTS, TOP_K = 1024, 3584, 8, 2
CONTENDERS = ("moekit", "eager", "batched_mm", "grouped_mm", "floor", "floor_bf16")


def make_experts(dtype: torch.dtype) -> MixtralExperts:
    config = MixtralConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K
    )
    experts = MixtralExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, HIDDEN**-0.5)
        experts.down_proj.normal_(0, INTER**-0.5)
    return experts.to(dtype).requires_grad_(False)


def run_experts(experts: MixtralExperts, name: str, hidden, index, weights) -> torch.Tensor:
    experts.config._experts_implementation = name
    return experts(hidden, index, weights)


def make_floor(tokens: int, dtype: torch.dtype = torch.float32):
    """Dense GEMMs with the FLOPs of the experts: T·k rows through [2I, H] and then [H, I]."""
    rows = torch.randn(tokens * TOP_K, HIDDEN).to(dtype)
    w1, w2 = torch.randn(2 * INTER, HIDDEN).to(dtype), torch.randn(HIDDEN, INTER).to(dtype)

    def floor():
        return F.linear(F.linear(rows, w1)[:, :INTER], w2)

    return floor


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_case(experts, tokens: int, dtype: torch.dtype, args) -> dict[str, float | None]:
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, HIDDEN, generator=generator).to(dtype)
    logits = torch.randn(tokens, EXPERTS, generator=generator)
    weights, index = route(logits, TOP_K)
    calls = {
        name: (lambda name=name: run_experts(experts, name, hidden, index, weights))
        for name in CONTENDERS
        if not name.startswith("floor")
    }
    calls["floor"] = make_floor(tokens)
    calls["floor_bf16"] = make_floor(tokens, torch.bfloat16)
    batched_gb = tokens * TOP_K * 3 * INTER * HIDDEN * experts.gate_up_proj.element_size() / 1e9
    if batched_gb > args.batched_mm_limit_gb:
        del calls["batched_mm"]

    reference = calls["eager"]().float()
    moekit_out = calls["moekit"]().float()
    rel_err = ((moekit_out - reference).norm() / reference.norm()).item()

    first = {name: time_once(fn) for name, fn in calls.items()}  # warm-up, and sizes the repetitions
    reps = max(args.min_reps, min(args.max_reps, int(args.budget_s / max(sum(first.values()), 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for rep in range(reps):
        rotated = names[rep % len(names) :] + names[: rep % len(names)]  # interleave, rotating the order
        for name in rotated:
            times[name].append(time_once(calls[name]))
    result: dict[str, float | None] = {name: None for name in CONTENDERS}
    result.update({name: statistics.median(ts) for name, ts in times.items()})
    result["reps"] = reps
    result["rel_err"] = rel_err
    return result


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f}"


def fmt_ratio(num: float | None, den: float | None) -> str:
    return "n/a" if num is None or den is None else f"{num / den:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tokens 1, 16, 128, 1024 and fewer repetitions")
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (default 1 16 128 1024 4096)")
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--budget-s", type=float, default=None, help="seconds of timing per case (target)")
    parser.add_argument("--batched-mm-limit-gb", type=float, default=1.5)
    args = parser.parse_args()
    args.tokens = args.tokens or ([1, 16, 128, 1024] if args.quick else [1, 16, 128, 1024, 4096])
    args.budget_s = args.budget_s or (4.0 if args.quick else 10.0)
    args.min_reps, args.max_reps = (3, 9) if args.quick else (3, 21)

    path = "native bf16 GEMMs" if native_low_precision(torch.bfloat16) else "fp32 upcast"
    print(f"CPU: {cpu_capability().summary()}; moekit's bf16 path: {path}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; H={HIDDEN} I={INTER} E={EXPERTS} k={TOP_K}"
    )
    print(
        "medians in ms; ratios > 1 mean moekit is faster (for /floor: moekit's cost over the dense fp32 and bf16"
        " floors)"
    )
    header = (
        f"{'dtype':5} {'tokens':>6} {'reps':>4} | {'moekit':>8} {'eager':>8} {'batched':>8} {'grouped':>8} "
        f"{'floor32':>8} {'floor16':>8} | {'grouped/':>8} {'eager/':>8} {'batched/':>8} {'moekit/':>8} "
        f"{'moekit/':>8} | {'rel err':>8}"
    )
    print(header)
    print(
        " " * 19
        + "|"
        + " " * 55
        + f"| {'moekit':>8} {'moekit':>8} {'moekit':>8} {'floor32':>8} {'floor16':>8} |"
    )
    print("-" * len(header))
    for dtype_name in args.dtypes:
        dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
        experts = make_experts(dtype)
        for tokens in args.tokens:
            r = bench_case(experts, tokens, dtype, args)
            print(
                f"{dtype_name:5} {tokens:>6} {r['reps']:>4} | {fmt_ms(r['moekit']):>8} {fmt_ms(r['eager']):>8} "
                f"{fmt_ms(r['batched_mm']):>8} {fmt_ms(r['grouped_mm']):>8} {fmt_ms(r['floor']):>8} "
                f"{fmt_ms(r['floor_bf16']):>8} | "
                f"{fmt_ratio(r['grouped_mm'], r['moekit']):>8} {fmt_ratio(r['eager'], r['moekit']):>8} "
                f"{fmt_ratio(r['batched_mm'], r['moekit']):>8} {fmt_ratio(r['moekit'], r['floor']):>8} "
                f"{fmt_ratio(r['moekit'], r['floor_bf16']):>8} | "
                f"{r['rel_err']:8.1e}",
                flush=True,
            )
        del experts


if __name__ == "__main__":
    main()
