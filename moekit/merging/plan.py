"""The dense merge planner: config + input checkpoints -> one job per output tensor, with every check done up front.

A job names its output tensor (name, dtype, shape), the input tensors that feed it (model, name) in config order,
the base tensor when the method uses one, and the method parameters resolved for this tensor (gradients and
filters evaluated at the tensor's layer position, with mergekit's precedence: slice source > slice > global).
Nothing here reads tensor data; shapes come from the headers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.config import (
    MergeConfig,
    Slice,
    Source,
    check_modules,
    evaluate_setting,
    warn_unused_gradient_values,
)
from moekit.errors import UserError
from moekit.io.checkpoint import Checkpoint
from moekit.io.writer import OutputTensor, ShardedWriter
from moekit.merging.job import Job, OutputPlan, TensorRef
from moekit.merging.method_table import METHOD_FACTS
from moekit.merging.registry import MergeMethod
from moekit.merging.stacked_experts import Unstacking, mergekit_order, stack_experts
from moekit.merging.tokenizer import Vocabulary, build_vocabulary
from moekit.options import MergeOptions


@dataclass
class Plan(OutputPlan):
    config: MergeConfig
    models: list[Checkpoint]
    reference: int  # the model whose config.json and tokenizer the output takes
    jobs: list[Job]
    layer_sources: list[tuple[int, int]] = field(default_factory=list)  # per output layer: (model, layer)
    vocab: Vocabulary | None = None  # tokenizer_source: embedding inputs are re-laid in its token order
    untied_head: bool = False  # the reference ties its head but the output has its own (see _untied_head)

    @property
    def method(self) -> MergeMethod:
        return self.jobs[0].op

    @property
    def num_layers(self) -> int:
        return len(self.layer_sources)

    @functools.cached_property
    def unstacking(self) -> Unstacking:
        """MoE experts merged stacked are written per expert, as the reference stores them (stacked_experts.py)."""
        return Unstacking(self.models[self.reference])

    def written_tensors(self) -> list[OutputTensor]:
        return self.unstacking.outputs(self.output_tensors)

    def write(self, writer: ShardedWriter, job: Job, tensor: torch.Tensor, last: bool) -> None:
        self.unstacking.write(writer, job.out, tensor, last)

    def cast_input(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.dtype is not None and x.dtype != cfg.dtype:
            x = x.to(cfg.dtype)  # mergekit casts inputs to `dtype` first: keep its rounding
        return x.to(compute_dtype_for(self, x.dtype))

    def align_inputs(self, job: Job, inputs: list[torch.Tensor], base: torch.Tensor | None):
        """As mergekit aligns one tensor's inputs: embeddings re-laid in the output vocabulary (tokenizer_source),
        the others in one dtype, the promotion of theirs (an fp32 and a bf16 checkpoint merge in fp32)."""
        if job.is_embedding and self.vocab is not None:
            return self.permute_vocabulary(job, inputs, base)
        if job.is_embedding:  # --unsafe-truncate-embeddings: the rows every input has (a no-op otherwise)
            rows = job.out.shape[0]
            inputs, base = [x[:rows] for x in inputs], (base[:rows] if base is not None else None)
        given = inputs + ([base] if base is not None else [])
        if len({x.dtype for x in given}) > 1 and all(x.is_floating_point() for x in given):
            hold = functools.reduce(torch.promote_types, [x.dtype for x in given])
            inputs, base = [x.to(hold) for x in inputs], (base.to(hold) if base is not None else None)
        return inputs, base

    def permute_vocabulary(self, job: Job, inputs: list[torch.Tensor], base: torch.Tensor | None):
        """Each input's rows re-laid in the output vocabulary's order (tokenizer_source; see tokenizer.py)."""
        refs = job.inputs + ([job.base] if job.base else [])
        stored = [self.models[r.model].tensors.infos[r.name].dtype for r in refs]
        hold = self.config.dtype or functools.reduce(torch.promote_types, stored)
        tensors = inputs + ([base] if base is not None else [])
        out = self.vocab.permute(tensors, [r.model for r in refs], hold)
        return out[: len(inputs)], (out[-1] if base is not None else None)

    def input_dtype(self, stored: torch.dtype) -> torch.dtype:
        if not stored.is_floating_point:
            return stored  # integers are only ever copied, as they are
        return compute_dtype_for(self, self.config.dtype or stored)

    def aligned_dtype(self, job: Job) -> torch.dtype:
        """The dtype the operation receives a job's inputs in: each cast (cast_input), then aligned to their
        promotion when they differ (align_inputs)."""
        refs = job.inputs + ([job.base] if job.base else [])
        dtypes = [self.input_dtype(self.models[r.model].tensors.infos[r.name].dtype) for r in refs]
        if all(d.is_floating_point for d in dtypes):
            return functools.reduce(torch.promote_types, dtypes)
        return dtypes[0]

    def scratch_bytes(self, job: Job, numel: int) -> int:
        """The method's working memory (method_table.py: float32 copies of an input, output included) and the
        cast of its output to the output dtype."""
        fixed, per_model = METHOD_FACTS[job.op.name].scratch
        computed = self.aligned_dtype(job)
        work = (fixed + per_model * len(job.inputs)) * numel * max(4, computed.itemsize)
        return int(work) + (numel * job.out.dtype.itemsize if job.out.dtype != computed else 0)

    def input_bytes(self, job: Job, rows: tuple[int, int] | None) -> tuple[int, int]:
        """The inputs as cast, then aligned to one dtype (align_inputs: a copy of each input in another dtype).
        With a tokenizer merge, an embedding's inputs are instead re-laid in the output's token order as they
        are read (Vocabulary.permute): at its peak that holds the inputs as read, their rows gathered in output
        order, the fallback rows and their running sum, and the re-laid inputs (padded to `vocab.size` rows)."""
        held, peak = super().input_bytes(job, rows)
        refs = job.inputs + ([job.base] if job.base else [])
        stored = [self.models[r.model].tensors.infos[r.name].dtype for r in refs]
        if not (job.is_embedding and self.vocab is not None):
            aligned = self.aligned_dtype(job)
            if all(self.input_dtype(x) == aligned for x in stored):
                return held, peak
            shape = job.out.shape
            numel = math.prod(shape) // shape[0] * (rows[1] - rows[0]) if rows else math.prod(shape)
            copies = len(refs) * numel * aligned.itemsize
            return copies, max(peak, held + copies)
        d = self.input_dtype(stored[0]).itemsize
        h = (self.config.dtype or functools.reduce(torch.promote_types, stored)).itemsize
        width = math.prod(job.out.shape[1:])
        tokens, size, k = self.vocab.n_tokens * width, self.vocab.size * width, len(refs)
        gathered = k * tokens * d
        # the running sum, the sum with one more model's rows, the new sum (and that model's rows cast to h)
        summing = 3 * tokens * h + (tokens * h if h != d else 0)
        relaid = tokens * h + tokens * d + k * size * d + (tokens * d if size > tokens else 0)
        return k * size * d, max(peak, held + gathered + max(summing, relaid))

    def describe(self, out: Path) -> list[str]:
        lines = [
            f"plan: {self.method.name} merge of {len(self.models)} models into '{out}' ({self.num_layers} layers)"
        ]
        for m in self.models:
            lines.append(
                f"  input: {m.path} ({m.family.name}, {m.num_layers} layers, {len(m.tensors.infos)} tensors)"
            )
        return lines

    def describe_job(self, job: Job) -> str:
        srcs = ", ".join(f"{self.models[r.model].ref}:{r.name}" for r in job.inputs)
        base = f" base={self.models[job.base.model].ref}" if job.base else ""
        return f"{job.op.name}({srcs}){base}"


def open_models(config: MergeConfig, options: MergeOptions) -> tuple[list[Checkpoint], dict[str, int]]:
    name = str(config.path) if config.path else "<config>"
    refs: list[tuple[str, str]] = []  # (model, where in the config, starting with the config's name)
    if config.base_model:
        refs.append((config.base_model, f"{name}: base_model"))
    for src in config.models or []:
        refs.append((src.model, src.where))
    for sl in config.slices or []:
        if sl.base_model:
            refs.append((sl.base_model, f"{sl.where}.base_model"))
        refs.extend((src.model, src.where) for src in sl.sources)
    models: list[Checkpoint] = []
    index: dict[str, int] = {}
    for ref, where in refs:
        if ref not in index:
            index[ref] = len(models)
            models.append(Checkpoint.open(ref, config.base_dir, where, options.allow_pickle))
    families = {m.family.name for m in models}
    if len(families) > 1 and not options.allow_crimes:
        listing = ", ".join(f"'{m.ref}' is {m.family.name}" for m in models)
        raise UserError(
            f"{name}: models of different architectures cannot be merged: {listing} (--allow-crimes merges them "
            "anyway when their tensors line up)"
        )
    return models, index


def build_plan(config: MergeConfig, options: MergeOptions, method: MergeMethod) -> Plan:
    """The plan of a config whose parameters `method` has checked (registry.method_for)."""
    models, index = open_models(config, options)
    try:
        stack_experts(models, method.elementwise)  # merged as mergekit merges them
        return _build(config, method, models, index)
    except BaseException:
        for m in models:
            m.close()
        raise


def _slices(config: MergeConfig, models: list[Checkpoint], index: dict[str, int]) -> list[Slice]:
    if config.slices is not None:
        return config.slices
    name = str(config.path) if config.path else "<config>"
    sources = [
        Source(s.model, (0, models[index[s.model]].num_layers), s.parameters, s.where) for s in config.models
    ]
    base = config.base_model
    # mergekit adds a base_model missing from `models` as one more input, whether or not the method treats it
    # as a base: with linear or karcher it is averaged in like the others.
    if base and all(s.model != base for s in sources):
        sources.append(Source(base, (0, models[index[base]].num_layers), {}, f"{name}: base_model"))
    return [Slice(sources, {}, None, f"{name}: models")]


def _build(config: MergeConfig, method: MergeMethod, models: list[Checkpoint], index: dict[str, int]) -> Plan:
    name = str(config.path) if config.path else "<config>"
    slices = _slices(config, models, index)
    spans = []
    for sl in slices:
        for src in sl.sources:
            n = models[index[src.model]].num_layers
            if src.layer_range[1] > n:
                raise UserError(
                    f"{src.where}.layer_range {list(src.layer_range)} goes past '{src.model}', which has {n} layers"
                )
        spans.append(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0])
        blocks = [(f"{sl.where}.parameters", sl.parameters)]
        for where, params in blocks + [(f"{src.where}.parameters", src.parameters) for src in sl.sources]:
            warn_unused_gradient_values(params, spans[-1:], where)
    warn_unused_gradient_values(config.parameters, spans, f"{name}: parameters")
    if config.modules:
        warn_unused_gradient_values(
            config.module_parameters, spans, f"{name}: modules.{config.modules[0]}.parameters"
        )

    ref_name = config.base_model or slices[0].sources[0].model
    reference = index[ref_name]
    ref_model = models[reference]
    check_modules(config, (ref_model.config.get("architectures") or [ref_model.family.name])[0])
    fam = ref_model.family
    ref_layer_tensors: dict[int, list[str]] = {}
    non_layer: list[str] = []
    for t in ref_model.tensors.names():
        loc = fam.layer_of(t)
        if loc is None:
            non_layer.append(t)
        else:
            ref_layer_tensors.setdefault(loc[0], []).append(loc[1])
    if not ref_layer_tensors:
        raise UserError(
            f"{name}: '{ref_name}' has no tensors named {fam.layer_prefix}N.*; is it a {fam.name} checkpoint?"
        )
    layer_rests = ref_layer_tensors[min(ref_layer_tensors)]
    check_not_quantised(models, method, name)
    untied_head = _untied_head(models, reference, fam)
    if untied_head:
        non_layer.append(TIED_HEAD)
    check_no_tensor_only_elsewhere(models, reference, non_layer, layer_rests, name)

    planner = _Planner(config, method, models, index, name)
    # Non-layer tensors before the layers (embeddings) come from the first slice; the others after them (final norm,
    # lm_head) from the last slice. mergekit 0.1.5 evaluates gradients at t = 0 for both.
    pre = [t for t in non_layer if fam.is_pre_layer(t)]
    post = [t for t in non_layer if t not in pre]
    jobs: list[Job] = []
    for t in sorted(pre):
        jobs.append(planner.job(t, [(s, t) for s in slices[0].sources], slices[0], t_pos=0.0))

    out_layer = 0
    layer_sources: list[tuple[int, int]] = []
    for sl in slices:
        start_lengths = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for offset in range(start_lengths):
            t_pos = offset / (start_lengths - 1) if start_lengths > 1 else 1.0
            for rest in layer_rests:
                out_name = fam.layer_tensor(out_layer, rest)
                ins = [(s, fam.layer_tensor(s.layer_range[0] + offset, rest)) for s in sl.sources]
                jobs.append(planner.job(out_name, ins, sl, t_pos))
            first = sl.sources[0]
            layer_sources.append((index[first.model], first.layer_range[0] + offset))
            out_layer += 1
    for t in sorted(post):
        jobs.append(planner.job(t, [(s, t) for s in slices[-1].sources], slices[-1], t_pos=0.0))

    # The order mergekit walks tensors (alphabetical, save for MoE experts): random methods then draw as it does.
    order = mergekit_order(ref_model)
    jobs.sort(key=lambda j: order(j.out.name))
    check_tensor_parameters(jobs, method)
    vocab = _vocabulary(config, models, index, jobs, name)
    plan = Plan(config, models, reference, jobs, layer_sources, vocab, untied_head)
    plan.warnings = planner.warnings
    return plan


def check_tensor_parameters(jobs: list[Job], method: MergeMethod) -> None:
    """The method's check of each tensor's resolved parameters, in the order the run computes them, worded as
    the run words a method's refusal (engine.MergeRunner.compute)."""
    if method.check_tensor is None:
        return
    for job in jobs:
        problem = method.check_tensor(job.params)
        if problem:
            raise UserError(f"tensor '{job.out.name}': {method.name}: {problem}")


# mergekit 0.1.5 declares lm_head optional with the embeddings as its tied name: a model without its own head
# (tie_word_embeddings) contributes its embeddings, and the head is merged when any model has one.
TIED_HEAD, TIED_TO = "lm_head.weight", "model.embed_tokens.weight"


def _untied_head(models: list[Checkpoint], reference: int, fam) -> bool:
    """True when the reference model ties its head but another model has its own: the output gets a merged
    head (so its config must say tie_word_embeddings: false), where mergekit would write one that is ignored."""
    if TIED_HEAD not in fam.embeddings or TIED_HEAD in models[reference].tensors:
        return False
    return any(TIED_HEAD in m.tensors for m in models)


def tensor_name_in(model: Checkpoint, name: str) -> str:
    """The tensor of `model` that stands for output tensor `name`: itself, or for a tied head the embeddings."""
    if name == TIED_HEAD and name not in model.tensors and TIED_TO in model.tensors:
        return TIED_TO
    return name


def check_no_tensor_only_elsewhere(
    models: list[Checkpoint], reference: int, non_layer: list[str], layer_rests: list[str], name: str
) -> None:
    """The output takes its tensor list from the reference model; a tensor that only another model has (q/k/v
    biases of a fine-tune, say) would be dropped without a word, so it is an error instead."""
    ref = models[reference]
    known_outside, known_inside = set(non_layer), set(layer_rests)
    for m in models:
        if m is ref:
            continue
        for t in m.tensors.names():
            loc = m.family.layer_of(t)
            if t == TIED_HEAD or (t in known_outside if loc is None else loc[1] in known_inside):
                continue
            raise UserError(
                f"{name}: tensor '{t}' is in model '{m.ref}' but not in '{ref.ref}', whose tensor list the output "
                f"takes; merging would drop it: make '{m.ref}' the base_model (or first model), or remove the tensor"
            )


def quantisation(config: dict) -> str | None:
    """The quantisation method a config.json declares (gptq, awq, bitsandbytes, ...), or None."""
    q = config.get("quantization_config") or config.get("compression_config")
    if not q:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    return str(method or ("bitsandbytes" if isinstance(q, dict) and "load_in_4bit" in q else "unknown"))


def check_not_quantised(models: list[Checkpoint], method: MergeMethod, name: str) -> None:
    """Quantised weights are packed integers and scales: arithmetic on them is meaningless. Only a copy
    (passthrough) may take them, and it keeps them (and their quantization_config) as they are."""
    if method.name == "passthrough":
        return
    refuse_quantised(
        models,
        f"'{method.name}' would do arithmetic on its packed integers: merge the full-precision model and quantise "
        "the result",
    )


def refuse_quantised(models: list[Checkpoint], why: str) -> None:
    """One line naming the first quantised model's config.json, then `why` (what would go wrong, and the fix)."""
    for m in models:
        q = quantisation(m.config)
        if q is not None:
            raise UserError(
                f"{m.path / 'config.json'}: model '{m.ref}' is quantised ({q}, quantization_config); {why}"
            )


def _vocabulary(
    config: MergeConfig, models: list[Checkpoint], index: dict[str, int], jobs: list[Job], name: str
) -> Vocabulary | None:
    """With tokenizer_source: the output vocabulary; embedding jobs get its row count as their output rows."""
    if config.tokenizer_source is None:
        return None
    base = index[config.base_model] if config.base_model else None
    vocab = build_vocabulary(
        config.tokenizer_source, models, base, config.pad_to_multiple_of, name, config.base_dir, config.tokens
    )
    for job in jobs:
        if not job.is_embedding:
            continue
        refs = job.inputs + ([job.base] if job.base else [])
        infos = [models[r.model].tensors.infos[r.name] for r in refs]
        if len({i.shape[1:] for i in infos}) > 1:
            listing = ", ".join(f"'{models[r.model].ref}' {list(i.shape)}" for r, i in zip(refs, infos))
            raise UserError(
                f"{name}: tensor '{job.out.name}': embedding widths differ ({listing}); these models cannot be merged"
            )
        for r, i in zip(refs, infos):
            top = int(vocab.source_rows[r.model].max())
            if top >= i.shape[0]:
                raise UserError(
                    f"{name}: tensor '{job.out.name}' of '{models[r.model].ref}' has {i.shape[0]} rows but its tokenizer "
                    f"uses token id {top}; fix vocab_size in its config.json"
                )
        job.out = OutputTensor(job.out.name, job.out.dtype, (vocab.size, *infos[0].shape[1:]))
    return vocab


class _Planner:
    def __init__(
        self,
        config: MergeConfig,
        method: MergeMethod,
        models: list[Checkpoint],
        index: dict[str, int],
        name: str,
    ):
        self.config, self.method, self.models, self.index, self.name = config, method, models, index, name
        self.warnings: list[str] = []

    def job(self, out_name: str, ins: list[tuple[Source, str]], sl: Slice, t_pos: float) -> Job:
        method, config = self.method, self.config
        base_name = sl.base_model or config.base_model
        base_ref = None
        inputs: list[tuple[Source, TensorRef]] = []
        for src, tensor in ins:
            ref = TensorRef(self.index[src.model], tensor_name_in(self.models[self.index[src.model]], tensor))
            self._check_exists(ref, src)
            if method.base != "ignored" and src.model == base_name:
                base_ref = ref
            else:
                inputs.append((src, ref))
        if method.base == "required" and base_ref is None:
            if base_name is None:
                raise UserError(f"{self.name}: merge_method '{method.name}' needs a base_model")
            raise UserError(
                f"{sl.where}: base_model '{base_name}' must be one of the slice's sources for '{method.name}'"
            )
        if len(inputs) < method.min_models:
            raise UserError(
                f"{self.name}: '{method.name}' needs at least {method.min_models} models besides the base, got {len(inputs)}"
            )
        if method.max_models is not None and len(inputs) > method.max_models:
            raise UserError(
                f"{self.name}: '{method.name}' takes at most {method.max_models} models besides the base, got {len(inputs)}"
            )

        refs = [r for _, r in inputs] + ([base_ref] if base_ref else [])
        shapes = {self._info(r).shape for r in refs}
        is_embedding = out_name in self.models[refs[0].model].family.embeddings
        shape = self._info(base_ref or inputs[0][1]).shape
        if len(shapes) > 1:
            listing = ", ".join(f"'{self.models[r.model].ref}' {list(self._info(r).shape)}" for r in refs)
            same_width = len({s[1:] for s in shapes}) == 1  # embeddings may differ in rows (vocabulary) only
            if not is_embedding or not same_width:
                raise UserError(
                    f"{self.name}: tensor '{out_name}': shapes differ ({listing}); these models cannot be merged"
                )
            if config.tokenizer_source is None and not config.unsafe_truncate_embeddings:
                raise UserError(
                    f"{self.name}: tensor '{out_name}': vocabulary sizes differ ({listing}); set tokenizer_source: base "
                    "(or union, or a model path) to merge models with different tokenizers, or pass "
                    "--unsafe-truncate-embeddings to keep the rows all of them have (right only if their token ids "
                    "agree)"
                )
            if config.tokenizer_source is None:
                # mergekit's TruncatedVocabulary: every input narrowed to the smallest vocabulary's rows
                shape = (min(s[0] for s in shapes), *shape[1:])
                self.warnings.append(
                    f"--unsafe-truncate-embeddings: tensor '{out_name}': {listing} truncated to {list(shape)} "
                    "(this assumes the kept token ids mean the same tokens in every model)"
                )
        ref_info = self._info(base_ref or inputs[0][1])
        params = self._params(out_name, inputs, sl, t_pos)
        if any(not self._info(r).dtype.is_floating_point for r in refs):
            self._check_copied(out_name, refs, params)
        out_dtype = self._out_dtype(refs) if ref_info.dtype.is_floating_point else ref_info.dtype
        return Job(
            OutputTensor(out_name, out_dtype, shape),
            method,
            [r for _, r in inputs],
            base_ref,
            params,
            is_embedding,
        )

    def _out_dtype(self, refs: list[TensorRef]) -> torch.dtype:
        """mergekit writes what its method returns unless `out_dtype` is set: the dtype the inputs are held in
        (`dtype`, else the promotion of the stored ones), or fp32 for the methods that lift half precision to
        fp32, which mergekit then writes as fp32 whatever `dtype` says: followed under `compute_dtype: mergekit`."""
        config = self.config
        stored = [self._info(r).dtype for r in refs if self._info(r).dtype.is_floating_point]
        held = config.dtype or functools.reduce(torch.promote_types, stored)
        if config.out_dtype is not None:
            return config.out_dtype
        if config.compute_dtype is None and self.method.returns_float32:
            return torch.promote_types(held, torch.float32)
        return held

    def _check_copied(self, out_name: str, refs: list[TensorRef], params: dict[str, Any]) -> None:
        """Integer tensors (packed quantised weights, indices, masks) may be copied, never computed with."""
        r = next(r for r in refs if not self._info(r).dtype.is_floating_point)
        dtype = str(self._info(r).dtype).removeprefix("torch.")
        if self.method.name != "passthrough" or params.get("scale") != [1.0]:
            raise UserError(
                f"{self.name}: tensor '{r.name}' of '{self.models[r.model].ref}' holds integers ({dtype}: packed "
                f"quantised weights or indices); '{self.method.name}' would compute with them as numbers: merge "
                "full-precision models, or copy the tensor with passthrough (scale 1)"
            )

    def _info(self, ref: TensorRef):
        return self.models[ref.model].tensors.infos[ref.name]

    def _check_exists(self, ref: TensorRef, src: Source) -> None:
        if ref.name not in self.models[ref.model].tensors:
            raise UserError(f"{src.where}: tensor '{ref.name}' is missing from model '{src.model}'")

    def _params(
        self, tensor: str, inputs: list[tuple[Source, TensorRef]], sl: Slice, t_pos: float
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.method.params:
            if p.per_model:
                values = []
                for src, _ in inputs:
                    v = self._lookup(p.name, tensor, t_pos, src.parameters, sl.parameters)
                    if v is None:
                        if p.required:
                            added = " (mergekit adds base_model as one more input)" * src.where.endswith(
                                "base_model"
                            )
                            raise UserError(
                                f"{src.where}: '{self.method.name}' needs parameter '{p.name}' for model '{src.model}'"
                                f"{added}"
                            )
                        v = p.default
                    values.append(_cast(p.kind, v))
                out[p.py_name] = values
            else:
                v = self._lookup(p.name, tensor, t_pos, None, sl.parameters)
                if v is None:
                    if p.required:
                        raise UserError(
                            f"{self.name}: parameters: '{self.method.name}' needs parameter '{p.name}'"
                        )
                    v = p.default
                out[p.py_name] = _cast(p.kind, v)
        if self.config.compute_dtype is None and self.method.takes_mergekit_order:
            out["mergekit_order"] = True
        return out

    def _lookup(
        self, key: str, tensor: str, t_pos: float, source_params: dict | None, slice_params: dict
    ) -> Any:
        for block in (source_params, slice_params, self.config.module_parameters, self.config.parameters):
            if block and key in block:
                v = evaluate_setting(block[key], tensor, t_pos)
                if v is not None:
                    return v
        return None


def _cast(kind: type, value: Any) -> Any:
    return kind(value) if kind in (int, float) and value is not None else value


def compute_dtype_for(plan: Plan, stored: torch.dtype) -> torch.dtype:
    """The dtype a method receives its inputs in; with `compute_dtype: mergekit`, the one mergekit holds them in
    (`dtype`, already applied to `stored`, else the stored dtype)."""
    if stored == torch.float64 or plan.config.compute_dtype is None:
        return stored
    return plan.config.compute_dtype
