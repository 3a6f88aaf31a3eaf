"""`build_moe`: the MoE half of `moekit.merge` (clown-MoE and sparse upcycling), from a config to an output dir."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from moekit.errors import UserError
from moekit.io.output_files import copy_generation_config, copy_tokenizer, write_json, write_recipe
from moekit.io.writer import check_shard_size, streaming_output
from moekit.lora.reference import AdaptedTensors
from moekit.moe.build import MoEPlan, build_plan, write_plan
from moekit.moe.config import PROMPT_GATE_MODES, parse_moe_config
from moekit.moe.gates import EMBED_NAME, PromptSet, prompt_gates, random_gates
from moekit.moe.layouts import shared_gate_value
from moekit.progress import tensor_progress

log = logging.getLogger("moekit")
PROCESS_BASELINE_BYTES = 350 * 1024 * 1024  # python + torch imported (as in moekit.merging.api)


def build_moe(
    raw: dict,
    path: Path | None,
    out: str | Path | None,
    *,
    force: bool = False,
    dry_run: bool = False,
    shard_size: int = 2_000_000_000,
    seed: int = 0,
    allow_nonfinite: bool = False,
    progress: bool = False,
    device: str = "cpu",
    print_fn=print,
    gate_dtype: torch.dtype | None = None,
    batch_size: int = 8,
) -> Path | None:
    """Build the MoE described by `raw` (a mergekit-moe config, `merge_method: moe`, or an upcycle) into `out`.

    Every check runs before the base model is loaded for gates and before any byte is written; the output appears
    atomically. Returns the output path, or None for a dry run. `gate_dtype` (default: the config's `gate_dtype`,
    float32) is the dtype the base runs in for hidden-state gates; bfloat16 reproduces mergekit-moe to the bit.
    """
    from moekit.merging.api import open_plan

    check_shard_size(shard_size)
    cfg = parse_moe_config(raw, path)
    with open_plan(cfg, build_plan, out, force, dry_run) as (out_path, plan):
        for warning in plan.warnings:
            log.warning(warning)
        if dry_run:
            describe_plan(plan, out_path, print_fn)
            return None
        dtype = gate_dtype or cfg.gate_dtype
        gates = compute_gates(
            plan, seed=seed, device=device, dtype=dtype, batch_size=batch_size, progress=progress
        )
        _write_output(plan, gates, out_path, force, shard_size, seed, allow_nonfinite, progress)
    return out_path


def compute_gates(
    plan: MoEPlan,
    *,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """(layers, vectors, hidden) float32: the routed experts' router vectors, then the shared expert's if it has one."""
    cfg = plan.config
    n = plan.gate_vectors_needed()
    if cfg.gate_mode not in PROMPT_GATE_MODES:
        return random_gates(cfg.gate_mode, plan.num_layers, n, plan.hidden, seed)
    if cfg.gate_mode != "cheap_embed" and isinstance(plan.base.tensors, AdaptedTensors):
        raise UserError(
            f"gate_mode {cfg.gate_mode}: hidden states of a base_model given as MODEL+LORA are not implemented; "
            "merge the adapter into the base first (a passthrough merge of 'MODEL+LORA'), or use cheap_embed"
        )
    specs = (plan.experts + plan.shared)[:n]
    sets = [PromptSet(s.positive_prompts, s.negative_prompts) for s in specs]
    return prompt_gates(
        cfg.gate_mode, plan.base.path, lambda: plan.base.tensors.read(EMBED_NAME), sets, plan.num_layers,
        device=device, batch_size=batch_size, dtype=dtype, progress=progress,
    )  # fmt: skip


def _write_output(
    plan: MoEPlan,
    gates: torch.Tensor,
    out: Path,
    force: bool,
    shard_size: int,
    seed: int,
    allow_nonfinite: bool,
    progress: bool,
) -> None:
    with streaming_output(out, force, plan.output_tensors, shard_size) as (tmp, writer):
        with tensor_progress(len(plan.jobs), plan.output_bytes, progress, label="building MoE") as advance:
            nbytes = {t.name: t.nbytes for t in plan.output_tensors}

            def write(name: str, tensor: torch.Tensor, last: bool) -> None:
                writer.write(name, tensor, last)
                if last:
                    advance(nbytes[name])

            write_plan(plan, gates, write, seed, allow_nonfinite)
        write_metadata(plan, tmp)


def write_metadata(plan: MoEPlan, out: Path) -> None:
    """config.json, tokenizer and generation config from the base, and the model card with the config."""
    cfg = plan.config
    write_json(out / "config.json", plan.output_config)
    copy_tokenizer(plan.base.path, out)
    copy_generation_config([plan.base.path], out)
    write_recipe(
        out, cfg.raw, cfg.name or f"{plan.layout.display} MoE", summary_lines(plan), plan.models, moe=True
    )


def summary_lines(plan: MoEPlan) -> list[str]:
    cfg = plan.config
    lines = [
        f"architecture: {plan.layout.display} (`{plan.layout.hf_class}`), {len(plan.experts)} experts, "
        f"{cfg.experts_per_token} per token",
        f"base model (attention, norms, embeddings, lm_head): `{cfg.base_model}`",
        f"router init: `{cfg.gate_mode}`",
    ]
    if cfg.upcycle:
        sigma = plan.experts[0].noise_scale or 0
        lines.append(f"sparse upcycling: every expert is a copy of the base MLP (noise_scale {sigma})")
    else:
        lines.append("experts: " + ", ".join(f"`{e.source}`" for e in plan.experts))
        if plan.shared:
            lines.append(f"shared expert: `{plan.shared[0].source}`")
    return lines + plan.notes + [f"**warning**: {w}" for w in plan.warnings]


def describe_plan(plan: MoEPlan, out: Path, print_fn=print) -> None:
    """The dry-run report: each output tensor and its source, the output size, and the memory estimate."""
    from moekit.merging.api import summarised

    cfg = plan.config
    print_fn(
        f"plan: {plan.layout.display} MoE ({plan.layout.hf_class}) with {len(plan.experts)} experts, "
        f"{cfg.experts_per_token} per token, gate_mode {cfg.gate_mode}, into '{out}' ({plan.num_layers} layers)"
    )
    for line in summary_lines(plan)[1:]:
        print_fn(f"  {line}")
    for job in summarised(plan.jobs, print_fn):
        dtype = str(job.out.dtype).removeprefix("torch.")
        if job.kind == "copy":
            src = f"{plan.models[job.model].ref}:{job.name}"
        elif job.kind == "expert":
            extra = "".join(
                f" {k}={v}"
                for k, v in (("noise_scale", job.expert.noise_scale), ("residual_scale", job.scale))
                if v is not None
            )
            src = f"{plan.models[job.model].ref}:{job.name}{extra}"
        elif job.kind == "router":
            src = f"gate vectors {job.rows[0]}..{job.rows[1] - 1} of layer {job.layer} ({cfg.gate_mode})"
        elif job.kind == "constant_gate":
            src = f"constant {shared_gate_value(job.out.dtype):.3g} (weight 1/2)"
        else:
            src = "zeros"
        print_fn(f"  {job.out.name} {list(job.out.shape)} {dtype} <- {src}")
    gb = 1024**3
    print_fn(f"output: {len(plan.jobs)} tensors, {plan.output_bytes / gb:.3f} GiB")
    peak = plan.peak_memory_estimate()
    print_fn(
        f"peak memory estimate: {peak / gb:.3f} GiB of tensors in flight + ~{PROCESS_BASELINE_BYTES / gb:.2f} GiB "
        "process baseline"
    )
    if cfg.gate_mode in ("hidden", "hidden_avg"):
        size = sum(i.numel for i in plan.base.tensors.infos.values()) * 4
        print_fn(
            f"hidden-state gates load the base model first: ~{size / gb:.3f} GiB (float32), freed before writing"
        )
    print_fn("dry run: nothing was written")
