"""The MoE build plan and its streaming write.

The plan names every output tensor (attention, norms, embeddings and lm_head from the base; experts from the MLPs
of their sources; routers from the gates) with its shape and the operation that makes it, after checking
families, shapes, vocabularies and names. The shared executor (merging/engine.py) writes it. The tensors that one
source tensor feeds (the same MLP projection copied into N experts) are next to each other in the plan, so the
executor reads each once per layer and writes it N times.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from moekit.config import DTYPES, torch_dtype
from moekit.errors import UserError
from moekit.io.checkpoint import Checkpoint
from moekit.io.writer import OutputTensor
from moekit.lora.reference import AdaptedTensors
from moekit.merging.job import Job, MemoryPhase, OutputPlan, TensorOp, TensorRef
from moekit.merging.plan import refuse_quantised
from moekit.moe.config import PROMPT_GATE_MODES, ExpertSpec, MoEConfig
from moekit.moe.gates import EMBED_NAME, PromptSet, prompt_gates, random_gates
from moekit.moe.layouts import (
    LAYOUTS,
    NOT_BUILT,
    ROLES,
    MoELayout,
    choose_layout,
    llama_cpp_differs,
    moe_config,
    not_built_sibling,
    shared_gate_value,
    supported_sources,
)  # fmt: skip
from moekit.options import MergeOptions

ZERO_QKV_BIAS = ("q_proj", "k_proj", "v_proj")
# What importing transformers' model classes, a Llama's modeling code and loading a tokenizer add to a process
# that has torch: 540 MiB peak against 218 MiB for torch alone with a 124 MiB model (transformers 5.x, CPU).
TRANSFORMERS_MODEL_CODE_BYTES = 200 * 1024**2
NOISE_SEED_OFFSET = 0x6E6F697365  # keeps the noise stream apart from the random-gate stream drawn with `seed`
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass
class GateVectors:
    """The router vectors, (layers, vectors, hidden) float32: computed once the plan is checked (MoEPlan.prepare),
    read by every router job."""

    tensor: torch.Tensor | None = None


def _copy(inputs, base):
    return inputs[0]


def _gate_rows(inputs, base, *, gates: GateVectors, layer: int, rows: tuple[int, int]) -> torch.Tensor:
    return gates.tensor[layer, rows[0] : rows[1]]


def _constant(inputs, base, *, shape: tuple[int, ...], value: float) -> torch.Tensor:
    return torch.full(shape, value)


def _expert_weights(inputs, base, *, noise_scale: float | None, residual_scale: float | None, rng=None):
    """mergekit's noise_and_scale: + N(0, noise_scale^2), then the down projection times residual_scale (float32)."""
    source = inputs[0]
    if not noise_scale and residual_scale is None:
        return source
    t = source.float()
    if noise_scale:
        t = t + torch.randn(t.shape, generator=rng) * noise_scale
    if residual_scale is not None:
        t = t * residual_scale
    return t


# The operations of an MoE build; none overwrites its inputs, so one source tensor feeds several experts.
COPY = TensorOp("copy", _copy, elementwise=True)  # a base tensor
EXPERT = TensorOp("expert", _expert_weights)  # an MLP projection, with its expert's residual scale
NOISY_EXPERT = TensorOp("expert", _expert_weights, random=True)  # ... and noise, from the run's generator
ROUTER = TensorOp("router", _gate_rows)  # rows of the gate vectors
ZEROS = TensorOp("zeros", _constant)  # a bias the source lacks
# a shared-expert gate of weight 1/2 (see layouts.shared_gate_value)
CONSTANT = TensorOp("constant", _constant)


@dataclass
class MoEPlan(OutputPlan):
    config: MoEConfig
    layout: MoELayout
    models: list[Checkpoint]  # models[0] is the base
    experts: list[ExpertSpec]
    shared: list[ExpertSpec]
    jobs: list[Job]
    dtype: torch.dtype
    num_layers: int
    hidden: int
    output_config: dict
    gates: GateVectors
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # printed on stderr and kept in the model card
    rng_seed_offset = NOISE_SEED_OFFSET  # the experts' noise: a stream apart from the random gates
    progress_label = "building MoE"

    @property
    def base(self) -> Checkpoint:
        return self.models[0]

    def gate_vectors_needed(self) -> int:
        """Router vectors the gate mode computes: routed experts, then the shared one (as mergekit orders them)."""
        return len(self.experts) + (
            len(self.shared) if self.shared and not self.config.shared_gate_is_zero(self.shared) else 0
        )

    def prepare(self, options: MergeOptions) -> None:
        self.gates.tensor = compute_gates(self, options)

    def scratch_bytes(self, job: Job, numel: int) -> int:
        """A copy or a router row is its input (or a view of the gates); an expert with noise or a residual scale
        works on a float32 copy (plus the noise and its sum); every output is then cast to the output dtype."""
        source = (
            self.models[job.inputs[0].model].tensors.infos[job.inputs[0].name].dtype if job.inputs else None
        )
        result = torch.float32 if job.op in (ROUTER, ZEROS, CONSTANT) else source
        work = 4 * numel if job.op in (ZEROS, CONSTANT) else 0
        if job.op in (EXPERT, NOISY_EXPERT):
            residual = job.params.get("residual_scale") is not None
            if job.op is NOISY_EXPERT or residual:
                result = torch.float32
                copies = (source != torch.float32) + 2 * (job.op is NOISY_EXPERT) + residual
                work = 4 * numel * copies
        return work + (numel * job.out.dtype.itemsize if job.out.dtype != result else 0)

    def held_while_writing(self) -> list[tuple[str, int]]:
        return [("the router gate vectors (float32)", self._gate_bytes())]

    def _gate_bytes(self) -> int:
        return self.num_layers * self.gate_vectors_needed() * self.hidden * 4

    def memory_before_writing(self, options: MergeOptions) -> list[MemoryPhase]:
        """Computing the router gates (prepare): random ones are drawn at once; cheap_embed reads the embedding
        in float32; hidden states load the base model in the gate dtype and run the prompts through it."""
        mode, gates = self.config.gate_mode, self._gate_bytes()
        if mode not in PROMPT_GATE_MODES:
            return [
                MemoryPhase(
                    "drawing the router gates", (("the gate vectors and their temporaries", 3 * gates),)
                )
            ]
        embed = self.base.tensors.infos[EMBED_NAME]
        vocab, numel = embed.shape[0], math.prod(embed.shape)
        if mode == "cheap_embed":
            parts = (("the base's embedding, as stored and in float32", numel * (embed.dtype.itemsize + 4)),)
            return [
                MemoryPhase(
                    "computing the router gates (cheap_embed)", parts + (("the gate vectors", gates),)
                )
            ]
        dtype = options.gate_dtype or self.config.gate_dtype
        # transformers maps the checkpoint and reads it: tensors stored in another dtype are converted, and the
        # mapped pages they were read from stay resident beside the copies (measured: a bfloat16 SmolLM2-135M
        # loaded in float32 peaks at the stored plus the converted size)
        infos = self.base.tensors.infos.values()
        weights = sum(math.prod(i.shape) * dtype.itemsize for i in infos)
        mapped = sum(math.prod(i.shape) * i.dtype.itemsize for i in infos if i.dtype != dtype)
        prompts = [p for s in self.experts + self.shared for p in s.positive_prompts + s.negative_prompts]
        longest = 1 + max((len(p.encode()) for p in prompts), default=0)  # tokens <= bytes, plus the BOS
        intermediate = self.base.tensors.infos[self.base.family.layer_tensor(0, self.base.family.mlp["gate"])]
        per_position = 2 * (self.num_layers + 1) * self.hidden + vocab + 3 * intermediate.shape[0]
        activations = min(options.batch_size, max(1, len(prompts))) * longest * per_position * 4
        code = 0 if "transformers.modeling_utils" in sys.modules else TRANSFORMERS_MODEL_CODE_BYTES
        parts = (
            ("transformers' model code and the tokenizer (measured on CPU)", code),
            (f"the base model in {str(dtype).removeprefix('torch.')}", weights),
            ("its checkpoint's pages, mapped while converting them", mapped),
            ("activations of one batch of prompts (at most)", activations),
            ("the gate vectors", gates),
        )
        return [MemoryPhase(f"computing the router gates ({mode}: the base model loaded)", parts)]

    def describe(self, out: Path) -> list[str]:
        cfg = self.config
        header = (
            f"plan: {self.layout.display} MoE ({self.layout.hf_class}) with {len(self.experts)} experts, "
            f"{cfg.experts_per_token} per token, gate_mode {cfg.gate_mode}, into '{out}' ({self.num_layers} layers)"
        )
        return [header] + [f"  {line}" for line in summary_lines(self)[1:]]

    def describe_job(self, job: Job) -> str:
        if job.op is ROUTER:
            rows, layer = job.params["rows"], job.params["layer"]
            return f"gate vectors {rows[0]}..{rows[1] - 1} of layer {layer} ({self.config.gate_mode})"
        if job.op is ZEROS:
            return "zeros"
        if job.op is CONSTANT:
            return f"constant {job.params['value']:.3g} (weight 1/2)"
        source = job.inputs[0]
        extra = "".join(
            f" {k}={job.params[k]}"
            for k in ("noise_scale", "residual_scale")
            if job.params.get(k) is not None
        )
        return f"{self.models[source.model].ref}:{source.name}{extra}"


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


def compute_gates(plan: MoEPlan, options: MergeOptions) -> torch.Tensor:
    """(layers, vectors, hidden) float32: the routed experts' router vectors, then the shared expert's if it has one."""
    cfg = plan.config
    n = plan.gate_vectors_needed()
    if cfg.gate_mode not in PROMPT_GATE_MODES:
        return random_gates(cfg.gate_mode, plan.num_layers, n, plan.hidden, options.seed)
    if cfg.gate_mode != "cheap_embed" and isinstance(plan.base.tensors, AdaptedTensors):
        raise UserError(
            f"gate_mode {cfg.gate_mode}: hidden states of a base_model given as MODEL+LORA are not implemented; "
            "merge the adapter into the base first (a passthrough merge of 'MODEL+LORA'), or use cheap_embed"
        )
    specs = (plan.experts + plan.shared)[:n]
    sets = [PromptSet(s.positive_prompts, s.negative_prompts) for s in specs]
    return prompt_gates(
        cfg.gate_mode, plan.base.path, lambda: plan.base.tensors.read(EMBED_NAME), sets, plan.num_layers,
        device=options.device, batch_size=options.batch_size, dtype=options.gate_dtype or cfg.gate_dtype,
        progress=options.progress,
    )  # fmt: skip


def build_plan(cfg: MoEConfig, options: MergeOptions) -> MoEPlan:
    """Open the models, check that they fit together, choose the output layout and lay out every tensor."""
    models: list[Checkpoint] = []
    index: dict[str, int] = {}

    def open_model(ref: str, where: str) -> int:
        if ref not in index:
            index[ref] = len(models)
            models.append(Checkpoint.open(ref, cfg.base_dir, where, options.allow_pickle))
        return index[ref]

    try:
        open_model(cfg.base_model, f"{_name(cfg)}: base_model")
        for spec in cfg.experts + cfg.shared_experts:
            open_model(spec.source, f"{spec.where}.source_model")
        # An MoE build copies MLPs into a new config and runs the base for hidden gates: packed integers and
        # their scales mean nothing there.
        refuse_quantised(
            models,
            "an MoE build needs full-precision models: build from the unquantised checkpoints and quantise the result",
        )
        return _plan(cfg, models, index)
    except BaseException:
        for m in models:
            m.close()
        raise


def _name(cfg: MoEConfig) -> str:
    return str(cfg.path) if cfg.path else "<config>"


def _plan(cfg: MoEConfig, models: list[Checkpoint], index: dict[str, int]) -> MoEPlan:
    base = models[0]
    name = _name(cfg)
    family = base.family
    if family.is_moe:
        raise UserError(
            f"{name}: base_model '{cfg.base_model}' is already an MoE ({family.name}); give a dense base model"
        )
    if not any(family.name in layout.sources for layout in LAYOUTS):
        sibling = not_built_sibling(family.name)
        if sibling is not None:
            raise UserError(
                f"{name}: base_model '{cfg.base_model}' is a {family.name} model, and {family.name} -> {sibling} is not "
                f"built: {NOT_BUILT[sibling][1]}"
            )
        raise UserError(
            f"{name}: base_model '{cfg.base_model}' is a {family.name} model, which moekit cannot turn into an MoE; "
            f"supported source families: {supported_sources()}"
        )
    for spec in cfg.experts + cfg.shared_experts:
        fam = models[index[spec.source]].family
        if fam.name != family.name:
            raise UserError(
                f"{spec.where}.source_model: '{spec.source}' is a {fam.name} model but base_model is {family.name}; "
                "every expert must come from the base's family"
            )

    layout = choose_layout(family.name, None if cfg.upcycle else bool(cfg.shared_experts), cfg.architecture)
    if layout is None:
        raise UserError(f"{name}: {_no_layout_reason(cfg, family.name)}")

    experts, shared = list(cfg.experts), list(cfg.shared_experts)
    notes = []
    if cfg.upcycle and layout.shared:
        # sigmoid(0) = 1/2 on the base-MLP shared expert, the other half from the routed copies (see layouts.py).
        experts = [replace(e, residual_scale=0.5) for e in experts]
        shared = [ExpertSpec(cfg.base_model, (), (), None, None, f"{name}: upcycle (shared expert)")]
        notes.append(
            "shared expert: the base MLP with a ~0 gate (weight 1/2); routed experts carry the other half"
        )
    elif cfg.shared_gate_is_zero(shared):
        notes.append("shared expert without prompts: a ~0 gate, so its weight is 1/2 for every token")

    hidden = _int_key(base, "hidden_size")
    num_layers = base.num_layers
    base_vocab = _vocab(base)
    for spec in experts + shared:
        m = models[index[spec.source]]
        if m is base:
            continue
        for key, want in (("hidden_size", hidden), (family.num_layers_key, num_layers)):
            got = _int_key(m, key)
            if got != want:
                raise UserError(
                    f"{spec.where}.source_model: '{spec.source}' has {key} {got} but base_model has {want}; experts "
                    "must have the base's shape"
                )
        if _vocab(m) != base_vocab and cfg.tokenizer_source is None:
            raise UserError(
                f"{spec.where}.source_model: '{spec.source}' has a vocabulary of {_vocab(m)} tokens but base_model has "
                f"{base_vocab}; the MoE uses the base's embeddings and tokenizer: set 'tokenizer_source: base' if "
                "that is what you want"
            )

    dtype = cfg.dtype or _base_dtype(base)
    expert_shapes = _mlp_shapes(experts, models, index, family, num_layers, hidden, "experts")
    shared_shapes = (
        _mlp_shapes(shared, models, index, family, num_layers, hidden, "shared expert") if shared else None
    )

    gates = GateVectors()
    jobs = _jobs(
        cfg,
        layout,
        models,
        index,
        experts,
        shared,
        dtype,
        hidden,
        num_layers,
        expert_shapes,
        shared_shapes,
        gates,
    )
    out_cfg = moe_config(
        layout, base.config, len(experts), cfg.experts_per_token, expert_shapes["gate"][0],
        shared_shapes["gate"][0] if shared_shapes else None, dtype,
    )  # fmt: skip
    if layout.own_lm_head and not any(j.out.name == LM_HEAD for j in jobs):
        notes.append("lm_head: a copy of the base's tied embedding (llama.cpp needs it for Qwen2-MoE)")
    differs = llama_cpp_differs(layout, len(experts), cfg.experts_per_token)
    warnings = [differs] if differs else []
    return MoEPlan(
        cfg, layout, models, experts, shared, jobs, dtype, num_layers, hidden, out_cfg, gates, notes, warnings
    )


def _no_layout_reason(cfg: MoEConfig, family: str) -> str:
    takes = [layout for layout in LAYOUTS if family in layout.sources]
    if cfg.architecture and not any(layout.name in cfg.architecture for layout in takes):
        wanted = ", ".join(cfg.architecture)
        return (
            f"architecture {cfg.raw.get('architecture')!r} ({wanted}) cannot be built from {family} sources; "
            f"{family} can become {' or '.join(lay.display for lay in takes)}"
        )
    if cfg.shared_experts:
        if any(layout.shared for layout in takes):
            return (
                f"shared_experts: architecture {cfg.raw.get('architecture')!r} has no shared expert; only Qwen2-MoE has "
                "one: use architecture: qwen2_moe, or remove shared_experts"
            )
        return (
            f"shared_experts: only Qwen2-MoE has a shared expert, and it is built from llama, mistral or qwen2 "
            f"sources; {family} sources cannot have one: remove shared_experts"
        )
    return (
        f"{family} sources become {' or '.join(lay.display for lay in takes)}, which needs exactly one shared expert: "
        "add shared_experts (one entry), or use upcycle"
    )


def _int_key(m: Checkpoint, key: str) -> int:
    value = m.config.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{m.path / 'config.json'}: '{key}' is missing or not an integer")
    return value


def _vocab(m: Checkpoint) -> int:
    info = m.tensors.infos.get(m.family.input_embedding)
    return info.shape[0] if info is not None else _int_key(m, "vocab_size")


def _base_dtype(base: Checkpoint) -> torch.dtype:
    """mergekit's rule: the base config's dtype; we fall back to the dtype of its embedding."""
    for key in ("dtype", "torch_dtype"):
        value = base.config.get(key)
        if isinstance(value, str) and value in DTYPES:
            return torch_dtype(value)
    return next(iter(base.tensors.infos.values())).dtype


def _mlp_shapes(specs, models, index, family, num_layers, hidden, what) -> dict[str, tuple[int, ...]]:
    """The MLP shape per role, the same for every layer and every source; a one-line error otherwise."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        m = models[index[spec.source]]
        for layer in range(num_layers):
            for role in ROLES:
                tensor = family.layer_tensor(layer, family.mlp[role])
                info = m.tensors.infos.get(tensor)
                if info is None:
                    raise UserError(f"{spec.where}.source_model: '{spec.source}' has no tensor '{tensor}'")
                want = shapes.setdefault(role, info.shape)
                if info.shape != want:
                    raise UserError(
                        f"{spec.where}.source_model: '{spec.source}' tensor '{tensor}' has shape {list(info.shape)} but "
                        f"the other {what} have {list(want)}; every expert must have the same MLP shape"
                    )
    gate, down = shapes["gate"], shapes["down"]
    if len(gate) != 2 or gate[1] != hidden or down != (hidden, gate[0]) or shapes["up"] != gate:
        raise UserError(
            f"{specs[0].where}: MLP shapes {[list(s) for s in shapes.values()]} do not fit hidden_size {hidden}"
        )
    return shapes


def _jobs(
    cfg, layout, models, index, experts, shared, dtype, hidden, num_layers, expert_shapes, shared_shapes, gates
) -> list[Job]:  # fmt: skip
    base = models[0]
    family = base.family
    mlp_names = set(family.mlp.values())
    front, back, per_layer = [], [], [[] for _ in range(num_layers)]
    for tensor, info in base.tensors.infos.items():
        where = family.layer_of(tensor)
        if where is None:
            (front if "embed" in tensor else back).append(_copy_job(tensor, dtype, info.shape, tensor))
            continue
        layer, rest = where
        if layer >= num_layers:
            raise UserError(
                f"{base.path}: tensor '{tensor}' is in layer {layer} but the config has {num_layers} layers"
            )
        if rest in mlp_names:
            continue
        _check_base_tensor(layout, base, tensor, rest)
        per_layer[layer].append(_copy_job(tensor, dtype, info.shape, tensor))

    def expert(out_name: str, spec: ExpertSpec, role: str, shapes: dict) -> Job:
        """An expert's projection from its source's MLP in this layer, with its noise and residual scale."""
        params = {
            "noise_scale": spec.noise_scale,
            "residual_scale": spec.residual_scale if role == "down" else None,
        }
        mlp = TensorRef(index[spec.source], family.layer_tensor(layer, family.mlp[role]))
        op = NOISY_EXPERT if spec.noise_scale else EXPERT
        return Job(OutputTensor(out_name, dtype, shapes[role]), op, [mlp], None, params)

    n_routed = len(experts)
    zero_gate = cfg.shared_gate_is_zero(shared)
    jobs = list(front)
    for layer in range(num_layers):
        layer_jobs = sorted(per_layer[layer], key=lambda j: j.out.name)
        if layout.zero_qkv_bias:
            layer_jobs += _zero_biases(base, layer, layer_jobs, dtype)
        jobs += layer_jobs
        jobs += [
            _zeros_job(layout.zero_tensor(layer, rest), dtype, (1, n_routed)) for rest in layout.zero_tensors
        ]
        jobs.append(_router_job(layout.router(layer), dtype, (n_routed, hidden), gates, layer, (0, n_routed)))
        for role in ROLES:
            for e in _grouped_by_source(experts):
                jobs.append(expert(layout.expert_tensor(layer, e, role), experts[e], role, expert_shapes))
        if shared:
            jobs += [
                expert(layout.shared_tensor(layer, role), shared[0], role, shared_shapes) for role in ROLES
            ]
            name = layout.shared_gate(layer)
            if zero_gate:
                params = {"shape": (1, hidden), "value": shared_gate_value(dtype)}
                jobs.append(Job(OutputTensor(name, dtype, (1, hidden)), CONSTANT, [], None, params))
            else:
                jobs.append(_router_job(name, dtype, (1, hidden), gates, layer, (n_routed, n_routed + 1)))
    if layout.own_lm_head and not any(j.out.name == LM_HEAD for j in back):
        embed = base.tensors.infos[EMBED]
        back.append(_copy_job(LM_HEAD, dtype, embed.shape, EMBED))
    return jobs + back


def _grouped_by_source(experts: list[ExpertSpec]) -> list[int]:
    """Expert indices ordered so that experts sharing a source model are adjacent (first appearance order)."""
    order: dict[str, list[int]] = {}
    for e, spec in enumerate(experts):
        order.setdefault(spec.source, []).append(e)
    return [e for group in order.values() for e in group]


def _copy_job(out_name: str, dtype: torch.dtype, shape: tuple[int, ...], base_tensor: str) -> Job:
    return Job(OutputTensor(out_name, dtype, shape), COPY, [TensorRef(0, base_tensor)])


def _zeros_job(out_name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Job:
    return Job(OutputTensor(out_name, dtype, shape), ZEROS, [], None, {"shape": shape, "value": 0.0})


def _router_job(out_name, dtype, shape, gates: GateVectors, layer: int, rows: tuple[int, int]) -> Job:
    params = {"gates": gates, "layer": layer, "rows": rows}
    return Job(OutputTensor(out_name, dtype, shape), ROUTER, [], None, params)


def _check_base_tensor(layout: MoELayout, base: Checkpoint, tensor: str, rest: str) -> None:
    if rest.startswith("mlp."):
        raise UserError(
            f"{base.path}: tensor '{tensor}' is not a gate/up/down projection weight; {layout.display} experts have no other MLP tensors"
        )
    if (
        rest.endswith(".bias")
        and not layout.attention_biases
        and not (layout.zero_qkv_bias and rest.split(".")[-2] in ZERO_QKV_BIAS)
    ):
        raise UserError(
            f"{base.path}: tensor '{tensor}': {layout.display} attention has no such bias; this base cannot become {layout.display}"
        )


def _zero_biases(base: Checkpoint, layer: int, layer_jobs: list[Job], dtype: torch.dtype) -> list[Job]:
    """Qwen2-MoE always has q/k/v biases; a Llama or Mistral source has none, and zeros compute the same thing."""
    have = {j.out.name for j in layer_jobs}
    added = []
    for proj in ZERO_QKV_BIAS:
        bias = base.family.layer_tensor(layer, f"self_attn.{proj}.bias")
        if bias not in have:
            rows = base.tensors.infos[base.family.layer_tensor(layer, f"self_attn.{proj}.weight")].shape[0]
            added.append(_zeros_job(bias, dtype, (rows,)))
    return added
