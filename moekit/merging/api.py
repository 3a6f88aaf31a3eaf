"""`moekit.merge(config, out, **options)`: the Python entry point behind `moekit merge`."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from moekit.allocator import return_freed_memory_promptly
from moekit.config import is_moe_config, parse_merge_config, read_yaml_documents
from moekit.errors import UserError
from moekit.io.checkpoint import pickle_allowed
from moekit.io.output_dir import check_free_space, check_output_free, check_output_spares_inputs, output_lock
from moekit.io.output_files import (
    copy_generation_config,
    copy_tokenizer,
    set_config_dtype,
    write_json,
    write_recipe,
)
from moekit.io.writer import check_shard_size, streaming_output
from moekit.lora.combine import is_adapter_merge_config, merge_adapters_config
from moekit.merging.engine import MergeRunner
from moekit.merging.plan import Plan, build_plan
from moekit.merging.stacked_experts import Unstacking
from moekit.progress import tensor_progress

log = logging.getLogger(__name__)
DEFAULT_SHARD_SIZE = 2_000_000_000
PROCESS_BASELINE_BYTES = 350 * 1024 * 1024  # python + torch + safetensors imported, measured on CPU


def resolve_out(out: str | Path | None, config_out: str | None, base_dir: Path | None) -> Path:
    if out is not None:
        return Path(out)
    if config_out:
        p = Path(config_out).expanduser()
        return p if p.is_absolute() or base_dir is None else base_dir / p
    raise UserError("no output directory: pass -o/--out DIR or set 'out:' in the config")


@contextlib.contextmanager
def open_plan(cfg, build, out, force: bool, dry_run: bool):
    """(output path, plan) for a parsed config, closed after the block. The output is checked free before the
    (slow) planning, and checked not to hold an input after it, so nothing is read for a run that would be refused
    anyway; a real run holds the output's lock from before the check to the end of the block."""
    out_path = resolve_out(out, cfg.out, cfg.base_dir)
    with contextlib.nullcontext() if dry_run else output_lock(out_path):
        if not dry_run:
            check_output_free(out_path, force)
        plan = build(cfg)
        try:
            check_output_spares_inputs(out_path, [m.path for m in plan.models])
            check_free_space(out_path, plan.output_bytes)
            yield out_path, plan
        finally:
            plan.close()


def merge(
    config: str | Path | dict,
    out: str | Path | None = None,
    *,
    force: bool = False,
    dry_run: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    seed: int = 0,
    allow_nonfinite: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
    device: str = "cpu",
    print_fn=print,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    allow_crimes: bool = False,
    intermediate_dir: str | Path | None = None,
) -> Path | None:
    """Merge the models described by `config` into the directory `out` (or the config's `out:`).

    A config of several YAML documents (mergekit-multi) runs each named merge into `intermediate_dir/NAME`
    (default: OUT-intermediate beside OUT) and the unnamed one into `out`; see moekit.merging.multi.

    Everything is validated before the first byte is written; the output appears atomically. Returns the output
    path, or None for a dry run (which prints the plan instead). `allow_pickle` lets models that hold only pickled
    weights (.bin/.pt) in, loaded with torch.load(weights_only=True); without it they are refused.
    `copy_tokenizer` and `write_model_card` are mergekit's output switches; `allow_crimes` lets models whose
    config.json names different architectures merge when their tensors line up (mergekit's --allow-crimes).
    """
    extras = OutputExtras(copy_tokenizer, write_model_card, allow_crimes)
    with pickle_allowed(allow_pickle):
        return _merge(
            config, out, force, dry_run, shard_size, seed, allow_nonfinite, progress, device, print_fn, extras,
            intermediate_dir,
        )  # fmt: skip


@dataclass(frozen=True)
class OutputExtras:
    """mergekit's switches for what goes around the weights, and its architecture check."""

    copy_tokenizer: bool = True
    write_model_card: bool = True
    allow_crimes: bool = False


def _merge(
    config, out, force, dry_run, shard_size, seed, allow_nonfinite, progress, device, print_fn, extras, intermediate_dir
):  # fmt: skip
    return_freed_memory_promptly()
    docs, path = read_yaml_documents(config)
    rest = (shard_size, seed, allow_nonfinite, progress, device, print_fn, extras)
    if len(docs) > 1:  # mergekit-multi: named merges that later documents merge
        from moekit.merging.multi import merge_documents

        one = lambda raw, p, o, f, d: _merge_one(raw, p, o, f, d, *rest)  # noqa: E731
        return merge_documents(docs, path, out, intermediate_dir, force, dry_run, one, print_fn)
    return _merge_one(docs[0], path, out, force, dry_run, *rest)


def _merge_one(
    raw, path, out, force, dry_run, shard_size, seed, allow_nonfinite, progress, device, print_fn, extras
):
    if is_adapter_merge_config(raw):
        return merge_adapters_config(
            raw, path, out, force=force, dry_run=dry_run, seed=seed, print_fn=print_fn
        )
    if is_moe_config(raw):
        from moekit.moe.api import build_moe

        if extras != OutputExtras():
            raise UserError(
                "--no-copy-tokenizer, --no-write-model-card and --allow-crimes apply to dense merges, not MoE builds"
            )

        return build_moe(
            raw, path, out, force=force, dry_run=dry_run, shard_size=shard_size, seed=seed,
            allow_nonfinite=allow_nonfinite, progress=progress, device=device, print_fn=print_fn,
        )  # fmt: skip
    check_shard_size(shard_size)
    build = functools.partial(build_plan, allow_crimes=extras.allow_crimes)
    cfg = dataclasses.replace(
        parse_merge_config(raw, path),
        copy_tokenizer=extras.copy_tokenizer,
        write_model_card=extras.write_model_card,
    )
    with open_plan(cfg, build, out, force, dry_run) as (out_path, plan):
        if dry_run:
            describe_plan(plan, out_path, print_fn)
            return None
        _write_all(plan, out_path, force, shard_size, seed, allow_nonfinite, progress)
    return out_path


def _write_all(
    plan: Plan, out: Path, force: bool, shard_size: int, seed: int, allow_nonfinite: bool, progress: bool
) -> None:
    unstack = Unstacking(plan.models[plan.reference])
    with streaming_output(out, force, unstack.outputs(plan.output_tensors), shard_size) as (tmp, writer):
        with tensor_progress(len(plan.jobs), plan.output_bytes, progress) as advance:
            runner = MergeRunner(
                plan,
                seed=seed,
                allow_nonfinite=allow_nonfinite,
                on_progress=lambda job: advance(job.out.nbytes),
            )
            runner.run(lambda job, tensor, last: unstack.write(writer, job.out, tensor, last))
        write_dense_metadata(plan, tmp)


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


def describe_plan(plan: Plan, out: Path, print_fn=print) -> None:
    """The dry-run report: every output tensor with its method and inputs, the size, and the memory estimate."""
    print_fn(
        f"plan: {plan.method.name} merge of {len(plan.models)} models into '{out}' ({plan.num_layers} layers)"
    )
    for m in plan.models:
        print_fn(
            f"  input: {m.path} ({m.family.name}, {m.num_layers} layers, {len(m.tensors.infos)} tensors)"
        )
    for job in summarised(plan.jobs, print_fn):
        srcs = ", ".join(f"{plan.models[r.model].ref}:{r.name}" for r in job.inputs)
        base = f" base={plan.models[job.base.model].ref}" if job.base else ""
        dtype = str(job.out.dtype).removeprefix("torch.")
        print_fn(f"  {job.out.name} {list(job.out.shape)} {dtype} <- {plan.method.name}({srcs}){base}")
    gb = 1024**3
    peak = plan.peak_memory_estimate()
    print_fn(f"output: {len(plan.jobs)} tensors, {plan.output_bytes / gb:.3f} GiB")
    print_fn(
        f"peak memory estimate: {peak / gb:.3f} GiB of tensors in flight + ~{PROCESS_BASELINE_BYTES / gb:.2f} GiB "
        "process baseline"
    )
    print_fn("dry run: nothing was written")


PLAN_LINES = 60  # a dry run lists this many output tensors at most: the first ones, a count, the last ones


def summarised(jobs: list, print_fn) -> Iterator:
    """The jobs a dry run lists one by one; for a long plan, the first and last few, with one line saying how
    many are left out in between (a million-tensor plan must not print a million lines)."""
    if len(jobs) <= PLAN_LINES:
        yield from jobs
        return
    head, tail = jobs[: PLAN_LINES - 10], jobs[-10:]
    yield from head
    print_fn(f"  ... {len(jobs) - len(head) - len(tail)} more tensors like these ...")
    yield from tail
