"""Device check of moekit's Triton path on one CUDA GPU, within a fixed time: the kernel and runtime tests on CUDA,
shapes past int32 offsets, CUDA-graph capture and torch.compile of the experts, and a benchmark against
transformers' grouped_mm experts and a dense bf16 cuBLAS GEMM pair of the same FLOPs.

    bash bench/gpu_check.sh                  # on a bare GPU machine: makes a venv on the image's packages, runs this
    python bench/gpu_check.py --out DIR      # where moekit (with moekit.kernels) already imports
    python bench/gpu_check.py --smoke        # CPU, Triton interpreter, tiny shapes: checks this script itself

Benchmark: Mixtral-8x7B's layer (H=4096, I=14336, E=8, k=2) and Qwen3-30B-A3B's (H=2048, I=768, E=128, k=8), bf16,
T = 1 ... 16384 tokens, forward and forward+backward; medians of CUDA-event timings, TFLOP/s (6·T·k·H·I per
forward, 3x that with the backward) and the peak memory a case adds. moekit runs with fixed tiles by rows per
expert (autotuning every case would not fit the time); the tests phase exercises the autotuner.

Every phase runs in its own subprocess, with a timeout from what is left of --budget-s, so a phase that fails,
hangs or runs out of time is recorded and the others still run; inside a phase every case is in its own
try/except, and cases that would start too close to the deadline are recorded as skipped. Results:
DIR/results.jsonl (one line per case, appended as it finishes) and DIR/summary.md (rewritten after every phase).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = [  # name, most seconds it may take
    ("env", 60),
    ("tests", 200),
    ("correctness", 90),
    ("large", 120),
    ("graphs", 120),
    ("bench", 10_000),
]
SHAPES = {
    "mixtral-8x7b": dict(H=4096, I=14336, E=8, k=2),
    "qwen3-30b-a3b": dict(H=2048, I=768, E=128, k=8),
}
TOKENS = [1, 16, 128, 1024, 4096, 16384]
SMOKE_SHAPES = {"smoke-a": dict(H=32, I=16, E=4, k=2), "smoke-b": dict(H=48, I=24, E=8, k=4)}
SMOKE_TOKENS = [1, 5]


# --------------------------------------------------------------------------------------------------------
# Shared by the phases (each runs in a fresh process)
# --------------------------------------------------------------------------------------------------------


class Context:
    def __init__(self, args):
        self.smoke, self.out, self.deadline = args.smoke, Path(args.out), args.deadline
        import torch

        self.torch = torch
        self.device = "cpu" if self.smoke else "cuda"

    def left(self) -> float:
        return self.deadline - time.time()

    def emit(self, record: dict) -> None:
        line = json.dumps(record, default=str)
        print(line, flush=True)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(line + "\n")

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def case(self, phase: str, name: str, fn, **fields) -> None:
        """Run one case; its record carries status ok / failed (with the error) / skipped (no time left)."""
        record = {"phase": phase, "case": name, **fields}
        if self.left() < 5:
            self.emit({**record, "status": "skipped", "why": "deadline"})
            return
        start = time.time()
        try:
            record.update(fn() or {})
            record.setdefault("status", "ok")
        except Exception as error:  # noqa: BLE001 - one failing case must not lose the others
            record.update(status="failed", error=f"{type(error).__name__}: {error}"[:800])
            record["traceback"] = traceback.format_exc()[-1500:]
        record["seconds"] = round(time.time() - start, 2)
        self.emit(record)
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


def make_problem(ctx: Context, tokens: int, H: int, I: int, E: int, k: int, dtype=None, seed: int = 0):
    """bf16 inputs on the device: hidden [T, H], routing (softmax top-k, renormalised), experts' weights."""
    torch = ctx.torch
    from moekit.runtime.routing import route

    dtype = dtype or torch.bfloat16
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    hidden = torch.randn(tokens, H, generator=gen, device=ctx.device).to(dtype)
    logits = torch.randn(tokens, E, generator=gen, device=ctx.device)
    routing = route(logits, k)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen, device=ctx.device) * H**-0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=gen, device=ctx.device) * I**-0.5).to(dtype)
    return hidden, routing.indices, routing.weights.to(dtype), gate_up, down


def dense_reference(torch, hidden, idx, weights, gate_up, down, tokens):
    """fp32 output rows of the chosen tokens, one (token, expert) at a time from the definition."""
    import torch.nn.functional as F

    inter = down.shape[2]
    rows = []
    for t in tokens.tolist():
        acc = torch.zeros(hidden.shape[1], dtype=torch.float32, device=hidden.device)
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            gu = gate_up[e].float() @ hidden[t].float()
            acc += weights[t, j].float() * (down[e].float() @ (F.silu(gu[:inter]) * gu[inter:]))
        rows.append(acc)
    return torch.stack(rows)


def rel_err(torch, got, want) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def moekit_tiles(rows_per_expert: float):
    """Fixed tiles by rows per expert (the decode and prefill candidates of ops._gpu_autotune_configs)."""
    from moekit.kernels import ops

    if rows_per_expert <= 16:
        return ops.TileConfig(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=4)
    return ops.TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


# --------------------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------------------


def phase_env(ctx: Context) -> None:
    torch = ctx.torch

    def versions():
        import triton

        info = dict(python=sys.version.split()[0], torch=torch.__version__, triton=triton.__version__)
        try:
            import transformers

            info["transformers"] = transformers.__version__
        except ImportError:
            info["transformers"] = None
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(
                gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda
            )
            info["capability"] = f"{props.major}.{props.minor}"
            info["device_count"] = torch.cuda.device_count()
        elif not ctx.smoke:
            raise RuntimeError("no CUDA device: run with --smoke on a CPU")
        return info

    ctx.case("env", "versions", versions)


def phase_tests(ctx: Context) -> None:
    def pytest_run():
        try:
            import pytest  # noqa: F401
        except ImportError:
            return {
                "status": "failed",
                "error": "pytest is not installed here (see gpu_check.sh MOEKIT_WHEELS)",
            }
        files = ["tests/test_kernels.py", "tests/test_runtime_triton.py", "tests/test_gpu_launch.py"]
        select = ["-k", "not oldest_allowed"]  # that one installs a Triton wheel from PyPI: no network here
        if ctx.smoke:
            files, select = (
                ["tests/test_runtime_triton.py", "tests/test_gpu_launch.py"],
                ["-k", "placement or grid"],
            )
        env = dict(os.environ)
        if not ctx.smoke:
            env.pop("TRITON_INTERPRET", None)
        timeout = max(10, ctx.left() - 5)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *select]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        tail = (done.stdout + done.stderr).strip().splitlines()[-25:]
        return {"status": "ok" if done.returncode == 0 else "failed", "rc": done.returncode, "tail": tail}

    ctx.case("tests", "pytest on " + ctx.device, pytest_run)


def phase_correctness(ctx: Context) -> None:
    """Forward and all four gradients of triton_moe_experts against float64 autograd of the definition."""
    torch = ctx.torch
    from moekit.kernels import triton_moe_experts

    def check(dtype, tokens, H, I, E, k, tol):
        def run():
            x, idx, w, gu, dn = make_problem(ctx, tokens, H, I, E, k, dtype=dtype, seed=tokens)
            idx[0, 0] = -1  # a dropped assignment
            leaves = [t.clone().requires_grad_() for t in (x, w, gu, dn)]
            out = triton_moe_experts(leaves[0], idx, *leaves[1:])
            grad = torch.randn_like(out, dtype=torch.float32)
            out.float().backward(grad)
            refs = [t.detach().double().requires_grad_() for t in (x, w, gu, dn)]
            import torch.nn.functional as F

            valid = idx >= 0
            safe = idx.clamp_min(0)
            gate_up_t = torch.einsum("th,tkoh->tko", refs[0], refs[2][safe])
            act = F.silu(gate_up_t[..., :I]) * gate_up_t[..., I:]
            y = torch.einsum("tki,tkhi->tkh", act, refs[3][safe])
            want = (y * (refs[1] * valid)[..., None]).sum(1)
            want.backward(grad.double())
            errors = {"out": rel_err(torch, out, want)}
            for name, got, ref in zip(("x", "weights", "gate_up", "down"), leaves, refs):
                errors[name] = rel_err(torch, got.grad, ref.grad)
            worst = max(errors.values())
            return {"errors": errors, "status": "ok" if worst <= tol else "MISMATCH", "tol": tol}

        return run

    cases = [(torch.float32, 37, 64, 48, 4, 2, 1e-4), (torch.bfloat16, 300, 256, 128, 8, 2, 2e-2)]
    cases.append((torch.bfloat16, 200, 128, 64, 16, 4, 2e-2))
    if ctx.smoke:
        cases = [(torch.float32, 7, 16, 8, 4, 2, 1e-4), (torch.bfloat16, 9, 16, 8, 4, 2, 2e-2)]
    for dtype, tokens, H, I, E, k, tol in cases:
        name = f"{str(dtype)[6:]} T={tokens} H={H} I={I} E={E} k={k}"
        ctx.case("correctness", name, check(dtype, tokens, H, I, E, k, tol))


def phase_large(ctx: Context) -> None:
    """T·k·H past 2^31: the [T·k, H] combine slots and the gathered rows need 64-bit offsets."""
    torch = ctx.torch
    from moekit.kernels import triton_moe_experts

    H, I, E, k = (32, 16, 4, 2) if ctx.smoke else (4096, 256, 8, 2)
    tokens = 9 if ctx.smoke else 2**31 // (k * H) + 4096
    sample = torch.cat([torch.arange(0, 4), torch.arange(tokens - 4, tokens)])

    def forward():
        x, idx, w, gu, dn = make_problem(ctx, tokens, H, I, E, k)
        with torch.no_grad():
            out = triton_moe_experts(x, idx, w, gu, dn, tiles=moekit_tiles(tokens * k / E))
        want = dense_reference(torch, x, idx, w, gu, dn, sample)
        err = rel_err(torch, out[sample.to(out.device)], want)
        return {
            "T": tokens,
            "slot_elements": tokens * k * H,
            "rel_err": err,
            "status": "ok" if err < 2e-2 else "MISMATCH",
        }

    def backward():
        x, idx, w, gu, dn = make_problem(ctx, tokens, H, I, E, k)
        leaf = x.clone().requires_grad_()
        out = triton_moe_experts(leaf, idx, w, gu, dn, tiles=moekit_tiles(tokens * k / E))
        grad = torch.randn_like(out)
        out.backward(grad)
        rows = sample.to(x.device)
        ref_x = x[rows].float().requires_grad_()
        ref = triton_reference_rows(torch, ref_x, idx[rows], w[rows], gu, dn)
        ref.backward(grad[rows].float())
        err = rel_err(torch, leaf.grad[rows], ref_x.grad)
        return {"T": tokens, "rel_err_grad_hidden": err, "status": "ok" if err < 3e-2 else "MISMATCH"}

    ctx.case("large", "forward past int32 offsets", forward)
    ctx.case("large", "backward past int32 offsets", backward)


def triton_reference_rows(torch, x, idx, w, gu, dn):
    """Differentiable fp32 experts output of a few rows (dense gather of their experts' weights)."""
    import torch.nn.functional as F

    inter = dn.shape[2]
    g = torch.einsum("th,tkoh->tko", x, gu[idx].float())
    act = F.silu(g[..., :inter]) * g[..., inter:]
    return (torch.einsum("tki,tkhi->tkh", act, dn[idx].float()) * w.float()[..., None]).sum(1)


def phase_graphs(ctx: Context) -> None:
    torch = ctx.torch
    from moekit.kernels import triton_moe_experts

    H, I, E, k, tokens = (32, 16, 4, 2, 6) if ctx.smoke else (1024, 512, 8, 2, 64)

    def cuda_graph():
        if ctx.device != "cuda":
            return {"status": "n/a", "why": "no CUDA device (smoke)"}
        x, idx, w, gu, dn = make_problem(ctx, tokens, H, I, E, k)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):  # autotunes (default tiles) before capture
                triton_moe_experts(x, idx, w, gu, dn)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_out = triton_moe_experts(x, idx, w, gu, dn)
        x2, idx2, w2, _, _ = make_problem(ctx, tokens, H, I, E, k, seed=1)
        x.copy_(x2), idx.copy_(idx2), w.copy_(w2)
        graph.replay()
        with torch.no_grad():
            eager = triton_moe_experts(x, idx, w, gu, dn)
        diff = float((static_out.float() - eager.float()).abs().max())
        return {"max_abs_diff_replay_vs_eager": diff, "status": "ok" if diff == 0 else "MISMATCH"}

    def graphed_training():
        if ctx.device != "cuda":
            return {"status": "n/a", "why": "no CUDA device (smoke)"}
        x, idx, w, gu, dn = make_problem(ctx, tokens, H, I, E, k)
        gu, dn = gu.requires_grad_(), dn.requires_grad_()

        def step(x_in, w_in):
            return triton_moe_experts(x_in, idx, w_in, gu, dn)

        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        graphed = torch.cuda.make_graphed_callables(step, (xs, ws))
        out = graphed(xs, ws)
        out.float().sum().backward()
        want_x = xs.grad.clone()
        xs.grad = None
        ref = step(xs, ws)
        ref.float().sum().backward()
        diff = float((want_x.float() - xs.grad.float()).abs().max())
        return {"max_abs_diff_grad_x": diff, "status": "ok" if diff == 0 else "MISMATCH"}

    def compiled(fullgraph: bool):
        def run():
            import torch._dynamo

            torch._dynamo.reset()
            x, idx, w, gu, dn = make_problem(ctx, tokens, H, I, E, k)
            backend = "aot_eager" if ctx.smoke else "inductor"
            fn = torch.compile(
                lambda a, i, b: triton_moe_experts(a, i, b, gu, dn), fullgraph=fullgraph, backend=backend
            )
            leaf = x.clone().requires_grad_()
            out = fn(leaf, idx, w)
            out.float().sum().backward()
            ref_leaf = x.clone().requires_grad_()
            ref = triton_moe_experts(ref_leaf, idx, w, gu, dn)
            ref.float().sum().backward()
            return {
                "backend": backend,
                "rel_err_out": rel_err(torch, out, ref),
                "rel_err_grad_x": rel_err(torch, leaf.grad, ref_leaf.grad),
            }

        return run

    ctx.case("graphs", "CUDA graph capture, inference, new routing on replay", cuda_graph)
    ctx.case("graphs", "make_graphed_callables, forward+backward", graphed_training)
    ctx.case("graphs", "torch.compile (graph breaks allowed), fwd+bwd", compiled(False))
    ctx.case("graphs", "torch.compile fullgraph=True, fwd+bwd", compiled(True))


def timed(ctx: Context, fn, min_seconds: float, max_iters: int) -> dict:
    """First call (compiles, autotunes), then the median of CUDA-event timings; the peak memory added."""
    torch = ctx.torch
    ctx.sync()
    if ctx.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if ctx.device == "cuda" else 0
    start = time.perf_counter()
    fn()
    ctx.sync()
    first = time.perf_counter() - start
    times = []
    spent = time.perf_counter()
    while len(times) < 3 or (len(times) < max_iters and time.perf_counter() - spent < min_seconds):
        if ctx.device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if ctx.device == "cuda" else None
    return {
        "first_s": round(first, 3),
        "median_ms": statistics.median(times) * 1e3,
        "iters": len(times),
        "peak_mib": peak,
    }


def contenders(ctx: Context, shape: dict, tokens: int, mode: str) -> dict:
    """name -> zero-argument callable doing one forward (or forward+backward) on shared inputs."""
    torch = ctx.torch
    import torch.nn.functional as F
    from moekit.kernels import triton_moe_experts

    H, I, E, k = shape["H"], shape["I"], shape["E"], shape["k"]
    x, idx, w, gu, dn = make_problem(ctx, tokens, H, I, E, k)
    train = mode == "fwd+bwd"
    grad = torch.randn_like(x)
    # The weights are Parameters shared with transformers' module, so every contender's gradients land on the
    # same leaves and are reset alike (no gradient accumulation favouring one side).
    leaves = [x.clone().requires_grad_(train), w.clone().requires_grad_(train)]
    leaves += [torch.nn.Parameter(t, requires_grad=train) for t in (gu, dn)]
    tiles = moekit_tiles(tokens * k / E)

    def run(fn):
        def call():
            if train:
                for leaf in leaves:
                    leaf.grad = None
                fn().backward(grad)
            else:
                with torch.no_grad():
                    fn()

        return call

    calls = {"moekit": run(lambda: triton_moe_experts(leaves[0], idx, *leaves[1:], tiles=tiles))}
    calls["grouped_mm"] = run(grouped_mm_experts(ctx, leaves, idx, H, I, E, k))
    rows = torch.randn(tokens * k, H, device=ctx.device, dtype=torch.bfloat16, requires_grad=train)
    w1 = torch.randn(2 * I, H, device=ctx.device, dtype=torch.bfloat16, requires_grad=train)
    w2 = torch.randn(H, I, device=ctx.device, dtype=torch.bfloat16, requires_grad=train)

    def dense():
        y = F.linear(F.linear(rows, w1)[:, :I], w2)
        if train:
            y.backward(torch.ones_like(y))
        return None

    calls["dense_bf16"] = (lambda: dense()) if train else run(lambda: F.linear(F.linear(rows, w1)[:, :I], w2))
    return calls


def grouped_mm_experts(ctx: Context, leaves, idx, H, I, E, k):
    """transformers' own grouped_mm experts (MixtralExperts) on the same weights; a hand-written
    torch._grouped_mm twin of it when transformers is not installed."""
    torch = ctx.torch
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
        config._experts_implementation = "grouped_mm"
        module = MixtralExperts(config).to(ctx.device)
        module.gate_up_proj, module.down_proj = leaves[2], leaves[3]
        return lambda: module(leaves[0], idx, leaves[1])
    except ImportError:
        import torch.nn.functional as F

        def hand_written():
            flat = idx.reshape(-1)
            order = torch.argsort(flat, stable=True)
            ends = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
            xs = leaves[0][order // k]
            gu = torch._grouped_mm(xs, leaves[2].transpose(1, 2), offs=ends)
            y = torch._grouped_mm(F.silu(gu[:, :I]) * gu[:, I:], leaves[3].transpose(1, 2), offs=ends)
            y = y * leaves[1].reshape(-1)[order, None]
            return torch.zeros_like(leaves[0]).index_add(0, order // k, y)

        return hand_written


def phase_bench(ctx: Context) -> None:
    shapes, token_counts = (SMOKE_SHAPES, SMOKE_TOKENS) if ctx.smoke else (SHAPES, TOKENS)
    min_seconds, max_iters = (0.0, 3) if ctx.smoke else (0.3, 50)
    for mode in ("fwd", "fwd+bwd"):
        for shape_name, shape in shapes.items():
            for tokens in token_counts:
                flops = 6 * tokens * shape["k"] * shape["H"] * shape["I"] * (3 if mode == "fwd+bwd" else 1)
                holder = {}

                def build(shape=shape, tokens=tokens, mode=mode, holder=holder):
                    holder["calls"] = contenders(ctx, shape, tokens, mode)
                    return {"status": "ok"}

                ctx.case("bench", f"{shape_name} T={tokens} {mode} inputs", build)
                for name, call in holder.get("calls", {}).items():

                    def measure(call=call, flops=flops):
                        result = timed(ctx, call, min_seconds, max_iters)
                        result["tflops"] = flops / (result["median_ms"] / 1e3) / 1e12
                        return result

                    ctx.case("bench", name, measure, shape=shape_name, T=tokens, mode=mode, flops=flops)
                holder.clear()


# --------------------------------------------------------------------------------------------------------
# The driver: phases in subprocesses, and the summary
# --------------------------------------------------------------------------------------------------------


def read_results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(out: Path, phases: list[dict], started: float) -> None:
    records = read_results(out)
    lines = [f"# moekit GPU check ({'smoke: CPU interpreter, tiny shapes' if SMOKE_MODE else 'CUDA'})", ""]
    env = next((r for r in records if r.get("case") == "versions"), {})
    lines.append(
        "Environment: " + ", ".join(f"{k}={env[k]}" for k in env if k not in ("phase", "case", "seconds"))
    )
    lines += [
        "",
        f"Wall time {time.time() - started:.0f} s.",
        "",
        "| phase | status | seconds |",
        "|---|---|---:|",
    ]
    lines += [f"| {p['phase']} | {p['status']} | {p['seconds']:.0f} |" for p in phases]
    lines += ["", "## Checks", "", "| phase | case | status | details |", "|---|---|---|---|"]
    for r in records:
        if r["phase"] == "bench":
            continue
        detail = {k: v for k, v in r.items() if k not in ("phase", "case", "status", "traceback", "tail")}
        lines.append(
            f"| {r['phase']} | {r['case']} | {r['status']} | {json.dumps(detail, default=str)[:300]} |"
        )
    tests = [r for r in records if r["phase"] == "tests" and r.get("tail")]
    for r in tests:
        lines += ["", "pytest tail:", "", "```", *r["tail"][-8:], "```"]
    bench = [r for r in records if r["phase"] == "bench" and "median_ms" in r]
    if bench:
        lines += ["", "## Benchmark (bf16; ms are CUDA-event medians; peak = extra MiB during the case)", ""]
        lines += ["| shape | mode | T | moekit ms | grouped_mm ms | dense ms | moekit TFLOP/s | grouped TFLOP/s |"
                  " dense TFLOP/s | grouped/moekit | moekit/dense | peak MiB moekit | peak MiB grouped |"]  # fmt: skip
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        keys = sorted(
            {(r["shape"], r["mode"], r["T"]) for r in bench}, key=lambda key: (key[1], key[0], key[2])
        )
        for shape, mode, tokens in keys:
            by = {r["case"]: r for r in bench if (r["shape"], r["mode"], r["T"]) == (shape, mode, tokens)}
            m, g, d = by.get("moekit"), by.get("grouped_mm"), by.get("dense_bf16")

            def f(r, key, fmt="{:.3g}"):
                return fmt.format(r[key]) if r and r.get(key) is not None else "–"

            ratio_g = f"{g['median_ms'] / m['median_ms']:.2f}×" if m and g else "–"
            ratio_d = f"{m['median_ms'] / d['median_ms']:.2f}" if m and d else "–"
            lines.append(
                f"| {shape} | {mode} | {tokens} | {f(m, 'median_ms')} | {f(g, 'median_ms')} | {f(d, 'median_ms')} | "
                f"{f(m, 'tflops')} | {f(g, 'tflops')} | {f(d, 'tflops')} | {ratio_g} | {ratio_d} | "
                f"{f(m, 'peak_mib', '{:.0f}')} | {f(g, 'peak_mib', '{:.0f}')} |"
            )
    failed = [r for r in records if r.get("status") in ("failed", "MISMATCH")]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- {r['phase']} / {r['case']}: {r.get('error', r.get('status'))}" for r in failed]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


SMOKE_MODE = False


def main() -> int:
    global SMOKE_MODE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock seconds for all phases")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--phase", choices=[name for name, _ in PHASES], help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="run these phases only")
    args = parser.parse_args()
    SMOKE_MODE = args.smoke
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase:  # a child: one phase
        if args.smoke:
            os.environ["TRITON_INTERPRET"] = "1"
        globals()[f"phase_{args.phase}"](Context(args))
        return 0

    started = time.time()
    deadline = started + args.budget_s
    (out / "results.jsonl").write_text("")
    phases = []
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if args.smoke:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    for name, cap in PHASES:
        if args.only and name not in args.only:
            continue
        left = deadline - time.time()
        if left < 10:
            phases.append({"phase": name, "status": "skipped (no time left)", "seconds": 0})
            continue
        timeout = left if args.smoke else min(cap, left)  # the interpreter's times say nothing about a GPU's
        child_deadline = time.time() + timeout - 5
        cmd = [
            sys.executable,
            __file__,
            "--phase",
            name,
            "--out",
            str(out),
            "--deadline",
            str(child_deadline),
        ]
        cmd += ["--smoke"] if args.smoke else []
        begin = time.time()
        with open(out / f"{name}.log", "w") as log:
            try:
                done = subprocess.run(
                    cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
                )
                status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
            except subprocess.TimeoutExpired:
                status = f"timeout after {timeout:.0f} s"
        phases.append({"phase": name, "status": status, "seconds": time.time() - begin})
        write_summary(out, phases, started)
        print(f"[{time.time() - started:5.0f} s] {name}: {status}", flush=True)
    write_summary(out, phases, started)
    records = read_results(out)
    bad = [r for r in records if r.get("status") in ("failed", "MISMATCH")]
    print(f"summary: {out / 'summary.md'}; {len(records)} records, {len(bad)} failed", flush=True)
    return 0 if not bad and all(p["status"] == "ok" for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
