"""What a real GPU would reject first, checked without one: grid limits, the device guard, the Triton floor.

- Grid arithmetic: every launcher's grid, for every tile config it can be launched with, at the largest shapes
  we support (H=16384, I=53248, E=256, 16384 tokens x k=8), must fit CUDA's limits (x < 2^31, y, z <= 65535).
  The launchers run on meta tensors with the launch itself captured, so nothing is allocated.
- Device guard: Triton launches on the current CUDA device, not the tensors'. With a fake second GPU (tensors
  that report cuda:1, `torch.cuda.device` recorded) the launch must happen inside `torch.cuda.device(cuda:1)`,
  and inputs on different devices must be refused before any launch.
- Triton floor: the kernels must compile ahead of time (for sm_90, no GPU needed) with the oldest Triton that
  pyproject allows, installed once into $MOEKIT_CACHE/triton-floor (a ~200 MB wheel from PyPI on first run).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moekit.kernels import ops
from packaging.version import Version

from moekit.errors import UserError

pytestmark = pytest.mark.interpreter

ROOT = Path(__file__).resolve().parents[1]
CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)
H, I, E, K, T = 16384, 53248, 256, 8, 16384
# conftest.py sets TRITON_INTERPRET=1 when there is no GPU; on a GPU the kernels here run on CUDA tensors.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def all_tile_configs() -> list[tuple[int, int]]:
    """(BLOCK_M, BLOCK_N) of every config a launcher may be given: autotune candidates of every dtype, fixed."""
    tiles = {(ops.INTERPRETER_TILES.block_m, ops.INTERPRETER_TILES.block_n)}
    tiles.add((ops.DOWN_BACKWARD_GPU_TILES.block_m, ops.DOWN_BACKWARD_GPU_TILES.block_n))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tiles |= {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in ops._gpu_autotune_configs(dtype)}
    return sorted(tiles)


def captured_grids(monkeypatch) -> list:
    """Replaces both launch paths (tile-parametrised and fixed) by a recorder of (kernel, grid for tiles)."""
    grids = []
    monkeypatch.setattr(ops, "_launch", lambda kernel, grid, *args, **kwargs: grids.append((kernel, grid)))
    monkeypatch.setattr(
        ops, "_run", lambda kernel, grid, *args, **kwargs: grids.append((kernel, lambda bm, bn: grid))
    )
    return grids


def test_every_grid_fits_cuda_limits_at_the_largest_shapes(monkeypatch):
    grids = captured_grids(monkeypatch)
    meta = dict(device="meta")
    n = T * K
    x = torch.empty(T, H, dtype=torch.bfloat16, **meta)
    gate_up = torch.empty(E, 2 * I, H, dtype=torch.bfloat16, **meta)
    down = torch.empty(E, H, I, dtype=torch.bfloat16, **meta)
    ids = torch.empty(n, dtype=torch.int32, **meta)
    order = torch.empty(n, dtype=torch.int32, **meta)
    offsets = torch.empty(E + 1, dtype=torch.int32, **meta)
    weights = torch.empty(T, K, **meta)
    h = torch.empty(n, I, dtype=torch.bfloat16, **meta)
    preact = torch.empty(n, 2 * I, dtype=torch.bfloat16, **meta)
    grad_out = torch.empty(T, H, dtype=torch.bfloat16, **meta)

    ops.expert_offsets(ids, E)
    ops.sort_by_expert(ids, offsets)
    ops.gate_up_swiglu(x, gate_up, order, offsets, K, store_preact=True)
    ops.down_combine(h, down, order, offsets, weights, T, K)
    ops.grouped_gemm(
        preact,
        gate_up,
        order,
        offsets,
        K,
        gather_a=False,
        out=torch.empty(n, H, **meta),
        transpose_weight=True,
    )
    ops.down_backward(grad_out, down, preact, order, offsets, weights, K, tiles=ops.DOWN_BACKWARD_GPU_TILES)
    ops.grouped_weight_grad(
        grad_out,
        h,
        order,
        offsets,
        K,
        gather_a=True,
        gather_b=False,
        out=torch.empty_like(down),
        scale=weights,
    )
    ops.grouped_weight_grad(
        preact, x, order, offsets, K, gather_a=False, gather_b=True, out=torch.empty_like(gate_up)
    )
    launched = {kernel.__name__ for kernel, _ in grids}
    assert {"_grouped_gemm_kernel", "_grouped_weight_grad_kernel"} <= launched
    for kernel, grid in grids:
        for block_m, block_n in all_tile_configs():
            dims = grid(block_m, block_n)
            assert len(dims) <= 3
            for dim, limit in zip(dims, CUDA_GRID_LIMITS):
                assert 1 <= dim <= limit, f"{kernel.__name__} grid {dims} with tiles {block_m}x{block_n}"


def test_grouped_program_order_covers_every_tile_once():
    """The folded, L2-grouped grid still gives every (row tile, column block) exactly one program."""
    import triton
    import triton.language as tl

    @triton.jit
    def tile_of_each_program(out_ptr, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        pid_m, pid_n = ops._grouped_program_order(pid, num_pid_m, num_pid_n, GROUP_M)
        tl.store(out_ptr + 2 * pid, pid_m)
        tl.store(out_ptr + 2 * pid + 1, pid_n)

    for num_pid_m, num_pid_n, group in [(7, 5, 3), (1, 9, 8), (64, 1, 8), (10, 10, 1)]:
        out = torch.full((num_pid_m * num_pid_n, 2), -1, dtype=torch.int32, device=DEVICE)
        tile_of_each_program[(num_pid_m * num_pid_n,)](out, num_pid_m, num_pid_n, GROUP_M=group)
        seen = sorted(map(tuple, out.tolist()))
        assert seen == [(m, n) for m in range(num_pid_m) for n in range(num_pid_n)]


class FakeCuda1(torch.Tensor):
    """A CPU tensor that says it lives on a second GPU."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_launch_runs_on_the_inputs_device_and_refuses_mixed_devices(monkeypatch):
    current = ["cuda:0"]
    launched_on = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        previous, current[0] = current[0], str(torch.device(device))
        try:
            yield
        finally:
            current[0] = previous

    class FakeKernel:
        __name__ = "fake"

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched_on.append(current[0])

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    monkeypatch.setattr(ops, "_grouped_gemm_kernel", FakeKernel())
    gen = torch.Generator().manual_seed(0)

    def on_gpu1(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype).as_subclass(FakeCuda1)

    a, w, out = on_gpu1(6, 8), on_gpu1(2, 4, 8), on_gpu1(6, 4)
    order, offsets = on_gpu1(6, dtype=torch.int32), on_gpu1(3, dtype=torch.int32)
    ops.grouped_gemm(a, w, order, offsets, 1, gather_a=True, out=out, tiles=ops.INTERPRETER_TILES)
    assert launched_on == ["cuda:1"]
    assert current == ["cuda:0"]  # restored

    with pytest.raises(UserError, match=r"cuda:1.*cpu|cpu.*cuda:1"):
        ops.grouped_gemm(
            a, w, order, offsets, 1, gather_a=True, out=torch.empty(6, 4), tiles=ops.INTERPRETER_TILES
        )
    assert launched_on == ["cuda:1"]  # nothing launched for the mixed call


def triton_floor() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    floors = set(re.findall(r'"triton>=([0-9.]+)"', text))
    assert len(floors) == 1, f"pyproject names different triton floors: {floors}"
    return floors.pop()


@pytest.mark.slow
def test_kernels_compile_with_the_oldest_allowed_triton():
    version = triton_floor()
    cache = Path(os.environ.get("MOEKIT_CACHE") or Path.home() / ".cache" / "moekit").expanduser()
    target = cache / "triton-floor" / version
    if not (target / "triton" / "__init__.py").exists():
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(target),
                f"triton=={version}",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, (
            f"could not install triton=={version} into {target}: {done.stderr[-2000:]}"
        )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(
        PYTHONPATH=str(target), TRITON_CACHE_DIR=str(cache / "triton-floor" / f"{version}-kernel-cache")
    )
    script = (
        "import json, triton; from dataclasses import asdict; from moekit.kernels.aot_check import check;"
        "print(json.dumps([triton.__version__, [asdict(r) for r in check(90, 'bf16')]]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    used, reports = json.loads(done.stdout.strip().splitlines()[-1])
    assert Version(used) == Version(version)
    names = {r["name"] for r in reports}
    assert {"gate_up_swiglu", "down_combine", "down_backward", "expert_offsets", "sort_by_expert"} <= names
    for r in reports:
        assert r["shared_bytes"] <= 227 * 1024, r


@pytest.mark.parametrize("num_experts,n", [(40, 1500), (3, 2500)])
def test_parallel_routing_is_a_stable_permutation(num_experts, n):
    """Many blocks of ids: counts, offsets and the stable expert order against torch's stable sort; dropped
    ids (-1 and E) follow the kept ones, in order."""
    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(-1, num_experts + 1, (n,), generator=gen)
    assert ops._routing_tiles(num_experts)[0] < n  # more than one block
    counts, offsets = ops.expert_offsets(ids.int().to(DEVICE), num_experts)
    order = ops.sort_by_expert(ids.int().to(DEVICE), offsets)
    counts, offsets, order = counts.cpu(), offsets.cpu(), order.cpu()
    kept = (ids >= 0) & (ids < num_experts)
    assert torch.equal(counts.long(), torch.bincount(ids[kept], minlength=num_experts))
    keys = torch.where(kept, ids, num_experts)
    assert torch.equal(order.long(), torch.argsort(keys, stable=True))
    assert int(offsets[-1]) == int(kept.sum())


def test_combine_reads_only_the_slots_of_kept_assignments():
    """The combine buffer is not zero-filled: unwritten slots (dropped assignments) hold NaN here."""
    gen = torch.Generator().manual_seed(5)
    tokens, k, hidden, num_experts = 6, 3, 20, 4
    ids = torch.randint(0, num_experts, (tokens * k,), generator=gen)
    ids[[1, 7, 8]] = -1
    _, offsets = ops.expert_offsets(ids.int().to(DEVICE), num_experts)
    order = ops.sort_by_expert(ids.int().to(DEVICE), offsets)
    for dtype in (torch.float32, torch.bfloat16):
        slots = torch.randn(tokens * k, hidden, generator=gen).to(dtype)
        slots[ids < 0] = float("nan")
        got = ops.combine_slots(slots.to(DEVICE), order, offsets, tokens, k).cpu()
        want = torch.where((ids >= 0)[:, None], slots.double(), 0).view(tokens, k, hidden).sum(1)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=0 if dtype == torch.float32 else 8e-3, atol=1e-6)
