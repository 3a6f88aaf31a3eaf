"""Expert parallelism on this machine: per-step time and all-to-all bytes for 1, 2 and 4 gloo processes (CPU).

    python bench/expert_parallel.py [--hidden 512 --intermediate 1024 --experts 8 --top-k 2 --tokens 512]

Weak scaling: every rank routes its own `--tokens` tokens, so W processes do W times the work of one. The peer,
measured in the same run, is one process without torch.distributed running all E experts on `--tokens` tokens
through `moe_forward` ("local"); with perfect scaling and a core per process, every EP row would take the
same time per step as "local" while moving W times as many tokens. This machine has 2 cores (shared): every process
runs one thread, so up to 2 processes ideal scaling keeps the step time of "local", and 4 processes
oversubscribe the cores two to one (ideal: twice the step time, the same tokens/s as 2).

Columns: medians over --steps timed steps, each the slowest rank's time; "a2a only" times the two exchanges of
one forward (dispatch and combine, the same split sizes) without the expert compute; bytes are rows sent to
other ranks per rank per forward (dispatch + combine; backward moves as many again).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compare import table  # noqa: E402

# One thread per process everywhere: on 2 shared cores, multi-threaded GEMMs in several processes spin on each
# other, and one thread per process keeps the rows comparable (ideal weak scaling: equal times up to 2 processes).
THREADS = 1


def make_weights(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole layer's weights, the same on every rank (seeded): router [E, H], gate_up, down."""
    g = torch.Generator().manual_seed(0)
    e, h, i = args.experts, args.hidden, args.intermediate
    return (
        torch.randn(e, h, generator=g) * h**-0.5,
        torch.randn(e, 2 * i, h, generator=g) * h**-0.5,
        torch.randn(e, h, i, generator=g) * i**-0.5,
    )


def make_tokens(args, rank: int) -> torch.Tensor:
    return torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(1 + rank))


def timed(fn, steps: int, warmup: int = 2, sync=None) -> list[float]:
    times = []
    for step in range(warmup + steps):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def run_local(args) -> dict:
    """The peer: one process, all experts, no torch.distributed."""
    from moekit.runtime import moe_forward, route

    torch.set_num_threads(THREADS)
    router, gate_up, down = make_weights(args)
    x = make_tokens(args, 0)
    weights, indices = route(x @ router.T, args.top_k)
    with torch.no_grad():
        fwd = timed(lambda: moe_forward(x, indices, weights, gate_up, down), args.steps)
    xg, gu, dn = x.clone().requires_grad_(), gate_up.clone().requires_grad_(), down.clone().requires_grad_()
    grad = torch.randn_like(x)
    step = timed(lambda: moe_forward(xg, indices, weights, gu, dn).backward(grad), args.steps)
    return {"fwd": statistics.median(fwd), "fwd_bwd": statistics.median(step), "a2a": 0.0, "bytes": 0}


def run_rank(args, rank: int, world: int) -> dict | None:
    """One rank of a `world`-process expert-parallel layer; rank 0 returns the medians."""
    import torch.distributed as dist

    from moekit.runtime import route
    from moekit.runtime.expert_parallel import (
        ExpertParallelExperts,
        all_to_all_rows,
        dispatch_traffic,
        exchange_counts,
        local_experts,
    )
    from moekit.runtime.sorting import sort_by_expert

    torch.set_num_threads(THREADS)
    router, gate_up, down = make_weights(args)
    mine = local_experts(args.experts, rank, world)
    x = make_tokens(args, rank)
    weights, indices = route(x @ router.T, args.top_k)
    layer = ExpertParallelExperts(
        gate_up[mine.start : mine.stop].clone(), down[mine.start : mine.stop].clone(), args.experts
    )
    with torch.no_grad():
        fwd = timed(lambda: layer(x, indices, weights), args.steps, sync=dist.barrier)
    xg, grad = x.clone().requires_grad_(), torch.randn_like(x)
    step = timed(lambda: layer(xg, indices, weights).backward(grad), args.steps, sync=dist.barrier)

    # The exchanges alone, with this step's split sizes.
    dispatch = sort_by_expert(indices, args.experts)
    send = dispatch.counts.view(world, -1).sum(dim=1).tolist()
    recv = exchange_counts(dispatch.counts, None).sum(dim=1).tolist()
    rows = x[dispatch.tokens[: dispatch.num_kept]]

    def exchanges():
        back = all_to_all_rows(rows, recv, send, None)
        all_to_all_rows(back, send, recv, None)

    with torch.no_grad():
        a2a = timed(exchanges, args.steps, sync=dist.barrier)
    traffic = dispatch_traffic(indices, args.experts, rank, world, args.hidden * x.element_size())

    # Per step, the slowest rank sets the pace: take the max over ranks, then the median over steps.
    per_step = torch.tensor([fwd, step, a2a], dtype=torch.float64)
    dist.all_reduce(per_step, op=dist.ReduceOp.MAX)
    sent = torch.tensor([2 * traffic.remote_bytes], dtype=torch.float64)
    dist.all_reduce(sent, op=dist.ReduceOp.SUM)
    if rank:
        return None
    fwd_m, step_m, a2a_m = (statistics.median(row) for row in per_step.tolist())
    return {"fwd": fwd_m, "fwd_bwd": step_m, "a2a": a2a_m, "bytes": float(sent) / world}


def worker(args, rank: int, world: int, port: int, out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(minutes=5),
    )  # fmt: skip
    try:
        result = run_rank(args, rank, world)
        if result is not None:
            out.write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()  # explicitly: gloo may abort at interpreter exit otherwise


def launch(args, world: int, workdir: Path) -> dict:
    """Run `world` worker processes on 127.0.0.1 and return rank 0's medians (judged by its file)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = workdir / f"world{world}.json"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": str(THREADS)}
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "worker"]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *passthrough, "--worker", str(rank), str(world), str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = [p.communicate()[0] for p in procs]
    if not out.is_file():
        raise SystemExit(f"{world} processes wrote no result:\n{logs[0][-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        rank, world, port, out = args.worker
        worker(args, int(rank), int(world), int(port), Path(out))
        return

    import tempfile

    results = {"local": run_local(args)}
    with tempfile.TemporaryDirectory() as tmp:
        for world in map(int, args.worlds.split(",")):
            results[world] = launch(args, world, Path(tmp))
    base = results["local"]
    rows = []
    for key, r in results.items():
        world = 1 if key == "local" else key
        tokens_per_s = world * args.tokens / r["fwd_bwd"]
        rows.append([
            "local (no dist)" if key == "local" else f"EP gloo x{world}", world, THREADS, args.tokens,
            f"{r['fwd'] * 1e3:.1f}", f"{r['fwd_bwd'] * 1e3:.1f}", f"{r['a2a'] * 1e3:.1f}" if key != "local" else "-",
            f"{r['bytes'] / 1e6:.2f}", f"{tokens_per_s:.0f}",
            f"{tokens_per_s / (args.tokens / base['fwd_bwd']):.2f}x",
        ])  # fmt: skip
    print(
        f"H={args.hidden} I={args.intermediate} E={args.experts} k={args.top_k} fp32, {args.tokens} tokens per rank, "
        f"median of {args.steps} steps, torch {torch.__version__}, "
        f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    header = ["setup", "procs", "threads/proc", "tokens/rank", "fwd ms", "fwd+bwd ms", "a2a only ms",
              "a2a MB/rank/fwd", "tokens/s (fwd+bwd)", "vs local"]  # fmt: skip
    print(table(header, rows))


if __name__ == "__main__":
    main()
