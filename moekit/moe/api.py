"""`build_moe`: the MoE half of `moekit.merge` (clown-MoE and sparse upcycling), from a config to an output dir."""

from __future__ import annotations

from pathlib import Path

from moekit.errors import UserError
from moekit.io.output_files import copy_generation_config, copy_tokenizer, write_json, write_recipe
from moekit.merging.engine import run_plan
from moekit.moe.build import MoEPlan, build_plan, summary_lines
from moekit.moe.config import parse_moe_config
from moekit.options import MergeOptions


def build_moe(
    raw: dict,
    path: Path | None,
    out: str | Path | None,
    options: MergeOptions | None = None,
    *,
    print_fn=print,
    **keywords,
) -> Path | None:
    """Build the MoE described by `raw` (a mergekit-moe config, `merge_method: moe`, or an upcycle) into `out`.

    Every check runs before the base model is loaded for gates and before any byte is written; the output appears
    atomically. Returns the output path, or None for a dry run. Options as for moekit.merge; `gate_dtype`
    (default: the config's `gate_dtype`, float32) is the dtype the base runs in for hidden-state gates: bfloat16
    reproduces mergekit-moe to the bit.
    """
    options = MergeOptions(**keywords) if options is None else options.replace(**keywords)
    if options.dense_only_changed:
        raise UserError(
            "--no-copy-tokenizer, --no-write-model-card, --allow-crimes and --unsafe-truncate-embeddings apply to "
            "dense merges, not MoE builds"
        )
    return run_plan(parse_moe_config(raw, path), build_plan, out, options, write_metadata, print_fn)


def write_metadata(plan: MoEPlan, out: Path) -> None:
    """config.json, tokenizer and generation config from the base, and the model card with the config."""
    cfg = plan.config
    write_json(out / "config.json", plan.output_config)
    copy_tokenizer(plan.base.path, out)
    copy_generation_config([plan.base.path], out)
    write_recipe(
        out, cfg.raw, cfg.name or f"{plan.layout.display} MoE", summary_lines(plan), plan.models, moe=True
    )
