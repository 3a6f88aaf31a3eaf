"""`moekit.merge(config, out, **options)`: the Python entry point behind `moekit merge`, and the files a dense
merge writes around its weights."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections import Counter
from pathlib import Path

from moekit.allocator import return_freed_memory_promptly
from moekit.config import is_moe_config, parse_merge_config, read_yaml_documents
from moekit.io.output_files import (
    copy_generation_config,
    copy_tokenizer,
    set_config_dtype,
    write_json,
    write_recipe,
)
from moekit.lora.combine import is_adapter_merge_config, merge_adapters_config
from moekit.merging.engine import run_plan
from moekit.merging.plan import Plan, build_plan
from moekit.merging.registry import method_for
from moekit.moe.api import build_moe
from moekit.options import MergeOptions

log = logging.getLogger(__name__)


def merge(
    config: str | Path | dict,
    out: str | Path | None = None,
    options: MergeOptions | None = None,
    *,
    print_fn=print,
    relative_to: str | Path | None = None,
    **keywords,
) -> Path | None:
    """Merge the models described by `config` (a path, YAML text or a dict) into the directory `out` (or the
    config's `out:`): a dense merge, an MoE build, or a merge of LoRA adapters.

    A config of several YAML documents (mergekit-multi) runs each named merge into `intermediate_dir/NAME`
    (default: OUT-intermediate beside OUT) and the unnamed one into `out`; see moekit.merging.multi.

    Everything is validated before the first byte is written; the output appears atomically. Returns the output
    path, or None for a dry run (which prints the plan with `print_fn` instead). How it runs is `options`, with
    any MergeOptions field given as a keyword on top (force, dry_run, shard_size, seed, allow_nonfinite,
    allow_pickle, progress, device, copy_tokenizer, write_model_card, allow_crimes, unsafe_truncate_embeddings,
    intermediate_dir, gate_dtype, batch_size). `relative_to` is the folder that the relative paths of a config
    given as a dict or text resolve against (default: the working directory; a file's are its folder's).
    """
    options = MergeOptions(**keywords) if options is None else options.replace(**keywords)
    return_freed_memory_promptly()
    docs, path = read_yaml_documents(config)
    if path is None and relative_to is not None:
        path = Path(relative_to) / "<config>"  # parsing takes a config's base folder from its file's path
    if len(docs) > 1:  # mergekit-multi: named merges that later documents merge
        from moekit.merging.multi import merge_documents

        def one(raw, p, o, force, dry_run):
            return _merge_one(raw, p, o, options.replace(force=force, dry_run=dry_run), print_fn)

        where = options.intermediate_dir
        return merge_documents(docs, path, out, where, options.force, options.dry_run, one, print_fn)
    return _merge_one(docs[0], path, out, options, print_fn)


def _merge_one(raw: dict, path: Path | None, out, options: MergeOptions, print_fn) -> Path | None:
    if is_adapter_merge_config(raw):
        return merge_adapters_config(
            raw, path, out, force=options.force, dry_run=options.dry_run, seed=options.seed, print_fn=print_fn
        )
    if is_moe_config(raw):
        return build_moe(raw, path, out, options, print_fn=print_fn)
    cfg = dataclasses.replace(
        parse_merge_config(raw, path),
        copy_tokenizer=options.copy_tokenizer,
        write_model_card=options.write_model_card,
        unsafe_truncate_embeddings=options.unsafe_truncate_embeddings,
    )
    build = functools.partial(build_plan, method=method_for(cfg))
    # write_dense_metadata is looked up at each run (not bound at import), so a test can stand in for it
    return run_plan(cfg, build, out, options, write_dense_metadata, print_fn)


def output_config(plan: Plan) -> dict:
    """The reference model's config.json, with the layer count (and per-layer lists) and dtype of the output."""
    ref = plan.models[plan.reference]
    cfg = copy.deepcopy(ref.config)
    key = ref.family.num_layers_key
    src_layers = ref.num_layers
    if plan.num_layers != src_layers or any(
        m != plan.reference or i != n for n, (m, i) in enumerate(plan.layer_sources)
    ):
        cfg[key] = plan.num_layers
        for name, value in list(cfg.items()):
            if isinstance(value, list) and len(value) == src_layers and name != "architectures":
                # Per-layer settings (e.g. layer_types) follow the layers they describe.
                cfg[name] = [plan.models[m].config.get(name, value)[i] for m, i in plan.layer_sources]
    dtypes = Counter(j.out.dtype for j in plan.jobs if j.out.dtype.is_floating_point)
    if dtypes:
        set_config_dtype(cfg, dtypes.most_common(1)[0][0])
    if plan.untied_head:
        cfg["tie_word_embeddings"] = False  # the merged head is in the output: a tied config would ignore it
    for job in plan.jobs:
        if job.is_embedding and job.out.name == ref.family.input_embedding:
            cfg[ref.family.vocab_key] = job.out.shape[0]
    return cfg


def write_dense_metadata(plan: Plan, out: Path) -> None:
    cfg = plan.config
    write_json(out / "config.json", output_config(plan))
    ref = plan.models[plan.reference]
    if cfg.copy_tokenizer and plan.vocab is not None:
        plan.vocab.save(out)  # tokenizer_source: the tokenizer the embeddings were re-laid for
    elif cfg.copy_tokenizer:
        copy_tokenizer(ref.path, out)
    if cfg.chat_template:
        set_chat_template(plan, out)
    copy_generation_config([ref.path] + [m.path for m in plan.models], out)
    inputs = [m.ref for m in plan.models]
    lines = [f"merge method: `{plan.method.name}`", f"inputs: {', '.join(f'`{r}`' for r in inputs)}"]
    if cfg.base_model:
        lines.append(f"base model: `{cfg.base_model}`")
    write_recipe(
        out,
        cfg.raw,
        cfg.name or f"{plan.method.name} merge",
        lines,
        plan.models,
        moe=False,
        model_card=cfg.write_model_card,
    )


def set_chat_template(plan: Plan, out: Path) -> None:
    """The config's chat_template (auto, a name, or Jinja) on the output tokenizer, as mergekit sets it."""
    from moekit.merging.tokenizer import resolve_chat_template, write_chat_template

    template = resolve_chat_template(plan.config.chat_template, [m.path for m in plan.models])
    if template is not None and not write_chat_template(out, template):
        log.warning("chat_template: the output has no tokenizer to carry it, so it was not saved")
