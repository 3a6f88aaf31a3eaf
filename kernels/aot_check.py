"""Compile every kernel variant for an NVIDIA GPU on a machine without one, and report what the code became.

The CPU interpreter runs programs that the GPU compiler may reject, and it tells nothing about the GPU code.
Triton's front end and its bundled ptxas need no GPU, so this compiles each variant that
`triton_moe_experts` launches, with the specialisation the JIT applies at launch on contiguous tensors
(unit strides become constants; pointers, other strides and H, I are multiples of 16), and reports whether
`tl.dot` became Hopper wgmma, whether loads are pipelined through cp.async, and the shared memory used.

    python -m moekit.kernels.aot_check [--arch 90] [--dtype bf16] [--all-configs]

Must run in a process where TRITON_INTERPRET is unset (kernels are defined per mode at import).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

SMEM_LIMIT_SM90 = 227 * 1024  # usable shared memory per block on H100
_SCALARS = {"alpha": "fp32", "limit": "fp32"}  # float arguments of the GEMM kernel (the rest are ints)


@dataclass(frozen=True)
class Variant:
    """One launch of a kernel as `ops` does it: flags, pointer dtypes and which strides are 1."""

    name: str
    kernel: str
    flags: dict
    unit_strides: tuple[str, ...]


_GEMM = "_grouped_gemm_kernel"
_WGRAD = "_grouped_weight_grad_kernel"
VARIANTS = [
    Variant("gate_up_swiglu", _GEMM, dict(GATHER_A=True, EPILOGUE=1, HAS_SCALE=False, STORE_PREACT=True),
            ("stride_ak", "stride_wk", "stride_on", "stride_pn")),
    Variant("down_combine", _GEMM, dict(GATHER_A=False, EPILOGUE=0, HAS_SCALE=True, STORE_PREACT=False),
            ("stride_ak", "stride_wk", "stride_on")),
    Variant("down_backward", _GEMM, dict(GATHER_A=True, EPILOGUE=2, HAS_SCALE=True, STORE_PREACT=False),
            ("stride_ak", "stride_wn", "stride_on", "stride_pn")),
    Variant("gate_up_backward_input", _GEMM, dict(GATHER_A=False, EPILOGUE=0, HAS_SCALE=False, STORE_PREACT=False),
            ("stride_ak", "stride_wn", "stride_on")),
    Variant("down_weight_grad", _WGRAD, dict(GATHER_A=True, GATHER_B=False, HAS_SCALE=True),
            ("stride_ak", "stride_bn", "stride_on")),
    Variant("gate_up_weight_grad", _WGRAD, dict(GATHER_A=False, GATHER_B=True, HAS_SCALE=False),
            ("stride_ak", "stride_bn", "stride_on")),
]  # fmt: skip


@dataclass(frozen=True)
class Report:
    """What one compiled variant looks like."""

    name: str
    tiles: str
    wgmma: bool
    cp_async: bool
    shared_bytes: int
    seconds: float


def _compile(
    fn, pointer_types: dict, ints_16: set, constexprs: dict, arch: int, num_warps: int, num_stages: int
):
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    aligned = [n for n in names if n not in constexprs and (n in pointer_types or n in ints_16)]
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:  # Triton >= 3.3
        signature = {
            n: "constexpr" if n in constexprs else pointer_types.get(n, _SCALARS.get(n, "i32")) for n in names
        }
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        constants = {(names.index(k),): v for k, v in constexprs.items()}
        source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    else:  # Triton 3.1-3.2: runtime arguments only in the signature, an AttrsDescriptor for alignment
        from triton.compiler.compiler import AttrsDescriptor

        signature = {
            i: pointer_types.get(n, _SCALARS.get(n, "i32"))
            for i, n in enumerate(names)
            if n not in constexprs
        }
        attrs = AttrsDescriptor(divisible_by_16={names.index(n) for n in aligned}, equal_to_1=set())
        source = ASTSource(
            fn, signature, constants={names.index(k): v for k, v in constexprs.items()}, attrs=attrs
        )
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def check(arch: int = 90, dtype: str = "bf16", all_configs: bool = False) -> list[Report]:
    """Compile every GEMM variant (and the histogram, sort and combine kernels) for sm_<arch>; one Report each.

    Works with Triton 3.1 (the floor in pyproject) and newer: the ahead-of-time API changed in 3.3."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("aot_check compiles for a GPU: run it with TRITON_INTERPRET unset")
    import torch
    from moekit.kernels import ops

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    tile_sets = [(c.kwargs, c.num_warps, c.num_stages) for c in ops._gpu_autotune_configs(torch_dtype)]
    main = [tile_sets[2]]  # the prefill config: 128x128x64 (bf16/fp16), 64x128x32 (fp32)
    t = ops.DOWN_BACKWARD_GPU_TILES
    down_backward = [
        ({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k}, t.num_warps, t.num_stages)
    ]
    precision = "ieee" if dtype == "fp32" else "tf32"
    reports = []
    for v in VARIANTS:
        fn = getattr(ops, v.kernel)
        pointers = {n: f"*{dtype}" for n in fn.arg_names if n.endswith("_ptr")}
        pointers.update(order_ptr="*i32", offsets_ptr="*i32", scale_ptr="*fp32", partial_ptr="*fp32")
        flags = {**v.flags, "UPCAST": False, "INPUT_PRECISION": precision, "GROUP_M": ops.GROUP_M}
        if v.kernel == _GEMM:  # the SiLU-gated epilogue without biases
            flags.update(E_PAD=8, HAS_BIAS=False, ACTIVATION=0, GATED=True)
        for tiles, warps, stages in (
            down_backward if v.name == "down_backward" else (tile_sets if all_configs else main)
        ):
            start = time.perf_counter()
            constexprs = {**flags, **tiles, **{s: 1 for s in v.unit_strides}}
            sizes = {"n_out", "k_dim", "m_dim", "n_dim"} | {n for n in fn.arg_names if n.startswith("stride")}
            compiled = _compile(fn, pointers, sizes, constexprs, arch, warps, stages)
            ptx = compiled.asm["ptx"]
            reports.append(
                Report(
                    v.name,
                    f"{tiles['BLOCK_M']}x{tiles['BLOCK_N']}x{tiles['BLOCK_K']} w{warps} s{stages}",
                    "wgmma.mma_async" in ptx,
                    "cp.async.cg" in ptx or "cp.async.ca" in ptx,
                    compiled.metadata.shared,
                    time.perf_counter() - start,
                )
            )
    block, bins = ops._routing_tiles(8)
    for name, kernel, constexprs, pointers in [
        ("expert_offsets", ops._block_histogram_kernel, {"BLOCK": block, "BINS": bins}, {}),
        ("sort_by_expert", ops._scatter_by_expert_kernel, {"BLOCK": block, "BINS": bins}, {}),
        ("combine_slots", ops._combine_slots_kernel, {"TOP_K": 2, "BLOCK_H": 1024},
         {"slots_ptr": f"*{dtype}", "valid_ptr": "*u8", "out_ptr": f"*{dtype}"}),
    ]:  # fmt: skip
        start = time.perf_counter()
        pointers = {**{n: "*i32" for n in kernel.arg_names if n.endswith("_ptr")}, **pointers}
        compiled = _compile(kernel, pointers, set(), constexprs, arch, 4, 1)
        reports.append(Report(name, "-", False, False, compiled.metadata.shared, time.perf_counter() - start))
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument(
        "--all-configs", action="store_true", help="every autotune config, not just the prefill one"
    )
    args = parser.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    print(
        f"{'variant':24} {'tiles':20} {'wgmma':6} {'cp.async':9} {'smem KiB':>9} {'fits':5} {'compile s':>9}"
    )
    for r in check(args.arch, args.dtype, args.all_configs):
        fits = r.shared_bytes <= SMEM_LIMIT_SM90
        print(
            f"{r.name:24} {r.tiles:20} {r.wgmma!s:6} {r.cp_async!s:9} {r.shared_bytes / 1024:9.1f} {fits!s:5} "
            f"{r.seconds:9.1f}"
        )


if __name__ == "__main__":
    main()
