"""`moekit extract-lora`: a PEFT LoRA adapter from a fine-tune and its base, by truncated SVD of each delta.

The options and their meaning follow mergekit-extract-lora 0.1.5: `max_rank` caps the rank, `sv_epsilon` drops
singular values at or below it (moekit adds `sv_relative`, relative to the largest one), embeddings go to
`modules_to_save` at full rank unless `embed_lora`, modules that are not 2-D weights (norms) are saved at full
rank unless `skip_undecomposable`, and include/exclude regexes (re.search) pick modules by name. A module whose
delta is exactly zero needs no factors and is left out.

Each module is read (base and fine-tune, one tensor each), decomposed in float32 and written out before the next
is read: memory holds one weight's delta and its SVD, whatever the model's size. By Eckart-Young the rank-r
truncation is the best rank-r approximation in the Frobenius norm; the relative error reported for each module
is measured on the factors as saved, ‖ΔW − B·A‖ / ‖ΔW‖.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from moekit.errors import UserError
from moekit.io.checkpoint import Checkpoint
from moekit.io.output_dir import atomic_output_dir, check_output_free, check_output_spares_inputs
from moekit.io.output_files import MARKER_NAME
from moekit.lora.adapter import PREFIX
from moekit.lora.adapter_writer import AdapterWriter
from moekit.progress import progress_bar


@dataclass(frozen=True)
class ExtractOptions:
    max_rank: int = 128
    sv_epsilon: float = 0.0
    sv_relative: float = 0.0
    distribute_scale: bool = True
    embed_lora: bool = False
    modules_to_save: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_undecomposable: bool = False


@dataclass
class ModuleResult:
    """What was saved for one module: 'lora' (rank, relative error), 'full', or 'unchanged' (zero delta)."""

    module: str
    kind: str
    rank: int = 0
    relative_error: float = 0.0
    shape: tuple[int, ...] = ()


@dataclass
class ExtractResult:
    out: Path
    modules: list[ModuleResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def max_relative_error(self) -> float:
        return max((m.relative_error for m in self.modules if m.kind == "lora"), default=0.0)


@dataclass
class _Job:
    module: str
    kind: str  # "lora", "embedding" (a LoRA on the transposed table) or "full"
    params: list[str]  # full tensor names of this module (weight first)


def _compile(patterns: tuple[str, ...], option: str) -> list[re.Pattern[str]]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise UserError(f"{option} {p!r}: not a valid regular expression ({e})") from None
    return compiled


def _modules(names: list[str]) -> dict[str, list[str]]:
    """Module name -> its tensors, in checkpoint order, weight first."""
    modules: dict[str, list[str]] = {}
    for name in names:
        module = name.rsplit(".", 1)[0] if "." in name else name
        modules.setdefault(module, []).append(name)
    for params in modules.values():
        params.sort(key=lambda n: not n.endswith(".weight"))
    return modules


def plan_extraction(
    base: Checkpoint, model: Checkpoint, options: ExtractOptions
) -> tuple[list[_Job], list[str]]:
    """Every module of the fine-tune with what to save for it; every check that can fail runs here."""
    if options.max_rank < 1:
        raise UserError(f"--rank/--max-rank must be at least 1, got {options.max_rank}")
    if options.sv_epsilon < 0 or not 0 <= options.sv_relative < 1:
        raise UserError("--sv-epsilon must be >= 0 and --sv-relative in [0, 1)")
    include = _compile(options.include, "--include-regex")
    exclude = _compile(options.exclude, "--exclude-regex")
    notes: list[str] = []
    infos, base_infos = model.tensors.infos, base.tensors.infos
    embed_in, embed_out = (e.removesuffix(".weight") for e in model.family.embeddings[:2])
    embed_lora = options.embed_lora
    vocab = [m.tensors.infos.get(f"{embed_in}.weight") for m in (base, model)]
    if embed_lora and all(vocab) and vocab[0].shape[0] != vocab[1].shape[0]:
        notes.append(
            f"vocabulary sizes differ ({vocab[0].shape[0]} in the base, {vocab[1].shape[0]} in the fine-tune): "
            "embeddings are saved in modules_to_save instead of as LoRA (as mergekit does)"
        )
        embed_lora = False
    saved = set(options.modules_to_save)
    jobs: list[_Job] = []
    for module, params in _modules(list(infos)).items():
        key = module.rsplit(".", 1)[-1]
        is_embedding = module in (embed_in, embed_out)
        if not embed_lora and is_embedding and not any(r.search(module) for r in exclude):
            saved.add(key)
        if module in saved or key in saved:
            jobs.append(_Job(module, "full", params))
            continue
        if (include and not any(r.search(module) for r in include)) or any(r.search(module) for r in exclude):
            continue
        weight = infos.get(f"{module}.weight")
        if weight is not None and len(weight.shape) == 2:
            for p in params:
                if p not in base_infos:
                    raise UserError(f"{model.path}: tensor '{p}' is not in the base model {base.path}")
                if base_infos[p].shape != infos[p].shape:
                    raise UserError(
                        f"tensor '{p}' is {list(infos[p].shape)} in the fine-tune but "
                        f"{list(base_infos[p].shape)} in the base; exclude it (-e) or save it (--save-module)"
                    )
            jobs.append(_Job(module, "embedding" if module == embed_in else "lora", params))
        elif not options.skip_undecomposable:
            saved.add(key)
            jobs.append(_Job(module, "full", params))
    for job in jobs:  # a module named by a later --save-module key is saved whole, not decomposed
        if job.kind != "full" and (job.module in saved or job.module.rsplit(".", 1)[-1] in saved):
            job.kind = "full"
    return jobs, notes


def decompose(delta: torch.Tensor, options: ExtractOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B·A the truncated SVD of `delta` (float32), as mergekit splits the singular values."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(options.max_rank, s.shape[0])
    if options.sv_epsilon > 0:
        rank = min(rank, int((s > options.sv_epsilon).sum()))
    if options.sv_relative > 0 and s.numel():
        rank = min(rank, int((s > options.sv_relative * s[0]).sum()))
    rank = min(rank, int((s > 0).sum()))
    if options.distribute_scale:
        root = s[:rank].sqrt()
        return root[:, None] * vh[:rank], u[:, :rank] * root
    return s[:rank, None] * vh[:rank], u[:, :rank]


def _target_modules(lora_modules: list[str], all_modules: list[str]) -> list[str]:
    """Short names (q_proj) where every module of that name is adapted, else the full module names."""
    by_key: dict[str, list[str]] = {}
    for m in all_modules:
        by_key.setdefault(m.rsplit(".", 1)[-1], []).append(m)
    chosen = set(lora_modules)
    targets: list[str] = []
    for key, modules in by_key.items():
        picked = [m for m in modules if m in chosen]
        if picked and len(picked) == len(modules):
            targets.append(key)
        else:
            targets.extend(picked)
    return targets


def extract_lora(
    base: str,
    model: str,
    out: str | Path,
    options: ExtractOptions | None = None,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
) -> ExtractResult:
    """Write a PEFT LoRA adapter to `out` that turns `base` into (approximately) `model`. See the module doc."""
    options = options or ExtractOptions()
    out = Path(out)
    check_output_free(out, force)
    base_ckpt = Checkpoint.open(base, where="--base", allow_pickle=allow_pickle)
    try:
        model_ckpt = Checkpoint.open(model, where="--model", allow_pickle=allow_pickle)
    except BaseException:
        base_ckpt.close()
        raise
    try:
        check_output_spares_inputs(out, [base_ckpt.path, model_ckpt.path])
        jobs, notes = plan_extraction(base_ckpt, model_ckpt, options)
        result = ExtractResult(out, notes=notes)
        with atomic_output_dir(out, force) as tmp:
            writer = AdapterWriter(tmp)
            try:
                _run(jobs, base_ckpt, model_ckpt, options, writer, result, progress)
                writer.finish(_adapter_config(base, jobs, result, model_ckpt))
            except BaseException:
                writer.abort()
                raise
            _write_card(tmp, base, model, options, result)
            settings = {
                k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()
            }
            recipe = {"extract_lora": {"base": base, "model": model, **settings}}
            (tmp / MARKER_NAME).write_text(yaml.safe_dump(recipe, sort_keys=False))  # lets --force replace it
    finally:
        base_ckpt.close()
        model_ckpt.close()
    return result


def _run(jobs, base: Checkpoint, model: Checkpoint, options, writer: AdapterWriter, result, progress) -> None:
    infos = model.tensors.infos
    total = sum(infos[p].nbytes for j in jobs for p in j.params)
    with progress_bar("extracting LoRA", total, progress, "bytes") as advance:
        for job in jobs:
            if job.kind == "full":
                for p in job.params:
                    writer.add(PREFIX + p, model.tensors.read(p))
                result.modules.append(ModuleResult(job.module, "full", shape=infos[job.params[0]].shape))
            else:
                result.modules.append(_extract_module(job, base, model, options, writer))
            advance(sum(infos[p].nbytes for p in job.params))


def _extract_module(job: _Job, base: Checkpoint, model: Checkpoint, options, writer) -> ModuleResult:
    weight = f"{job.module}.weight"
    stored = model.tensors.infos[weight].dtype
    delta = model.tensors.read(weight).float() - base.tensors.read(weight).float()
    if job.kind == "embedding":
        delta = delta.T  # PEFT's embedding LoRA: W + (B·A)ᵀ, A is r x vocab
    a, b = decompose(delta, options)
    shape = tuple(delta.shape)
    if a.shape[0] == 0:
        return ModuleResult(job.module, "unchanged", shape=shape)
    a, b = a.to(stored), b.to(stored)
    norm = torch.linalg.norm(delta)
    error = float(torch.linalg.norm(delta - b.float() @ a.float()) / norm) if norm > 0 else 0.0
    if job.kind == "embedding":
        writer.add(f"{PREFIX}{job.module}.lora_embedding_A", a)
        writer.add(f"{PREFIX}{job.module}.lora_embedding_B", b)
    else:
        writer.add(f"{PREFIX}{job.module}.lora_A.weight", a)
        writer.add(f"{PREFIX}{job.module}.lora_B.weight", b)
        bias = f"{job.module}.bias"
        if bias in job.params:
            # PEFT's lora_bias holds for every targeted layer and cannot merge into one without a bias, so the
            # fine-tune's bias is saved whole, as PEFT saves trained biases (bias: all).
            writer.add(f"{PREFIX}{job.module}.base_layer.bias", model.tensors.read(bias))
    return ModuleResult(job.module, "lora", int(a.shape[0]), error, shape)


def _adapter_config(base_ref: str, jobs: list[_Job], result: ExtractResult, model: Checkpoint) -> dict:
    """adapter_config.json: alpha = r for every module (scale 1), ranks that differ from r in rank_pattern."""
    ranks = {m.module: m.rank for m in result.modules if m.kind == "lora"}
    r = max(ranks.values(), default=1)
    odd = {m: k for m, k in ranks.items() if k != r}
    weights = [
        n.removesuffix(".weight")
        for n, i in model.tensors.infos.items()
        if n.endswith(".weight") and len(i.shape) == 2
    ]
    full = sorted({j.module.rsplit(".", 1)[-1] for j in jobs if j.kind == "full"})
    has_bias = any(f"{m}.bias" in model.tensors.infos for m in ranks)  # saved whole: see _extract_module
    return {
        "base_model_name_or_path": base_ref,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": odd,
        "alpha_pattern": odd,
        "target_modules": _target_modules(list(ranks), weights),
        "modules_to_save": full or None,
        "lora_bias": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "all" if has_bias else "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def _write_card(out: Path, base: str, model: str, options: ExtractOptions, result: ExtractResult) -> None:
    lora = [m for m in result.modules if m.kind == "lora"]
    lines = [
        "---",
        "library_name: peft",
        "tags:\n- moekit\n- lora",
        "---",
        f"# LoRA extracted from `{model}`",
        "",
        f"Made with moekit `extract-lora` from base `{base}`: {len(lora)} modules as LoRA (max rank "
        f"{options.max_rank}), {sum(m.kind == 'full' for m in result.modules)} saved whole.",
        f"Largest relative error of a module, ‖ΔW − B·A‖/‖ΔW‖: {result.max_relative_error:.3g}.",
        *(f"\nNote: {n}" for n in result.notes),
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n")
