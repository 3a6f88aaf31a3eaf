"""`calibrate_router`: train a clown-MoE's routers (and optionally Qwen2-MoE's shared-expert gate) on labelled text.

Everything but the router weights is frozen. Objectives, per batch of token windows:
* `lm`: next-token cross-entropy of the whole model. The routers' gradient is taken straight through every
  expert: the forward pass routes exactly as at inference (the loss is the model's own), but the backward pass
  sees the full softmax over all experts, each weighted by how its output would have changed the loss. A top-1
  renormalised router (Mixtral with k = 1) would otherwise get none: its one weight is always 1. It costs one
  expert MLP per expert per token in training;
* `label`: per token and MoE layer, -log of the router probability on the expert(s) built from the token's
  label's source model (read from `moekit_config.yaml`), averaged over layers and tokens;
* `both`: their sum, the label term times `label_coef`.
The Switch load-balancing loss (times `balance_coef`) and the router z-loss (times `z_coef`) are always added.

Before and after, the routing and the perplexity of held-out windows are measured per label (the same numbers as
`moekit route-stats`), so a calibration can be judged. The output is a complete model directory written
atomically: every tensor but the routers is copied byte for byte, and the card records the calibration.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from moekit import transformers_io
from moekit.errors import UserError, did_you_mean
from moekit.io.output_dir import check_output_free, check_output_spares_inputs
from moekit.io.safetensors_reader import checkpoint_infos
from moekit.io.writer import OutputTensor, streaming_output
from moekit.progress import progress_bar, transformers_bars
from moekit.runtime.routing import load_balancing_loss, router_z_loss
from moekit.stats.accumulate import RoutingAccumulator
from moekit.stats.collect import batches, moe_shape
from moekit.stats.metrics import specialisation
from moekit.stats.prompts import read_prompts_file, token_windows

OBJECTIVES = ("lm", "label", "both")
# Router tensors on disk (Mixtral: block_sparse_moe.gate; Qwen MoE: mlp.gate) and Qwen2-MoE's shared-expert gate.
ROUTER_ON_DISK = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight")
SHARED_GATE_ON_DISK = re.compile(r"model\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight")
ROUTER_MODULE = re.compile(r"layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate$")
CARD_HEADING = "## Router calibration (moekit calibrate-router)"


@dataclass(frozen=True)
class Evaluation:
    """Held-out routing and perplexity of one model state."""

    max_over_mean: float  # load of the busiest expert over the mean load, mean over MoE layers (1 = balanced)
    intended_share: dict[str, float]  # share of a label's top-k assignments that go to its intended experts
    mutual_information_bits: float | None  # label vs chosen expert, mean over layers (None with one label)
    perplexity: dict[str, float]


@dataclass
class CalibrationResult:
    out: Path
    before: Evaluation
    after: Evaluation
    steps: int
    seconds: float
    targets: dict[str, list[int]]
    losses: list[float] = field(default_factory=list)


def calibrate_router(
    moe_dir: str | Path,
    data: Mapping[str, str | Path | list[str]],
    out: str | Path,
    *,
    heldout: Mapping[str, str | Path | list[str]] | None = None,
    steps: int = 20,
    lr: float = 1e-3,
    objective: str = "both",
    label_coef: float = 0.3,
    balance_coef: float = 0.01,
    z_coef: float = 1e-3,
    train_shared_gate: bool = False,
    window: int = 128,
    batch_size: int = 4,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
    force: bool = False,
    progress: bool = False,
) -> CalibrationResult:
    """Calibrate the routers of the MoE in `moe_dir` on `data` (label -> text file or list of texts) into `out`.

    Held-out windows come from `heldout` (same form), or else the last `heldout_fraction` of each label's windows
    (never trained on). `steps` optimiser steps of AdamW(lr) over batches of `batch_size` windows of `window`
    tokens, cycling through the training windows in a seeded order. Returns the before/after evaluation.
    """
    moe_dir = Path(moe_dir)
    out = Path(out)
    _check_options(
        steps, lr, objective, label_coef, balance_coef, z_coef, window, batch_size, heldout_fraction
    )
    for label, value in [*data.items(), *(heldout or {}).items()]:
        _texts(label, value)  # a bad file is reported before the model is loaded
    with transformers_bars(progress):
        model, tokenizer, num_experts, top_k = _load(moe_dir, device)
    labels = list(data)
    targets = expert_targets(moe_dir, labels, num_experts) if objective != "lm" else {}
    check_output_free(out, force)  # before minutes of training, not after
    check_output_spares_inputs(out, [moe_dir])
    train, held = _windows(data, heldout, tokenizer, window, heldout_fraction)

    params = _trainable(model, train_shared_gate)
    before = evaluate(model, held, targets, num_experts, top_k, batch_size)
    start = time.perf_counter()
    losses = _train(
        model, train, targets, params, steps, lr, objective, (label_coef, balance_coef, z_coef), batch_size, seed,
        top_k, num_experts, progress,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    after = evaluate(model, held, targets, num_experts, top_k, batch_size)
    settings = {
        "data": {label: _origin(v) for label, v in data.items()},
        "heldout": {label: _origin(v) for label, v in heldout.items()} if heldout else f"last {heldout_fraction}",
        "steps": steps, "lr": lr, "objective": objective, "label_coef": label_coef,
        "balance_coef": balance_coef, "z_coef": z_coef, "train_shared_gate": train_shared_gate, "window": window,
        "batch_size": batch_size, "seed": seed,
        "targets": targets, "train_windows": sum(len(w) for w in train.values()), "seconds": round(seconds, 1),
    }  # fmt: skip
    _write(moe_dir, out, model, params, force, settings, before, after)
    return CalibrationResult(out, before, after, steps, seconds, targets, losses)


def _check_options(
    steps, lr, objective, label_coef, balance_coef, z_coef, window, batch_size, heldout_fraction
) -> None:
    if objective not in OBJECTIVES:
        raise UserError(
            f"--objective {objective!r} is unknown{did_you_mean(objective, OBJECTIVES)}; use lm, label or both"
        )
    for name, value, ok in (
        ("--steps", steps, steps >= 0),
        ("--lr", lr, lr > 0),
        ("--label-coef", label_coef, label_coef > 0),
        ("--balance-coef", balance_coef, balance_coef >= 0),
        ("--z-coef", z_coef, z_coef >= 0),
        ("--window", window, window >= 2),
        ("--batch-size", batch_size, batch_size >= 1),
        ("--heldout-fraction", heldout_fraction, 0 < heldout_fraction < 1),
    ):
        if not ok:
            raise UserError(f"{name} {value} is out of range")


def _load(moe_dir: Path, device: str):
    """(model with moekit's experts backend, tokenizer, num_experts, top_k); one-line errors for non-MoE input."""
    if not (moe_dir / "config.json").is_file():
        raise UserError(f"{moe_dir}: not a model directory (no config.json)")
    try:
        config = transformers_io.load_config(moe_dir)
    except ValueError as err:
        raise UserError(
            f"{moe_dir}/config.json: transformers cannot load it ({str(err).splitlines()[0]})"
        ) from err
    num_experts, top_k = moe_shape(config)
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    try:
        tokenizer = transformers_io.load_tokenizer(moe_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"{moe_dir}: no usable tokenizer files ({str(err).splitlines()[0]})") from err
    model = transformers_io.load_model(moe_dir, dtype=torch.float32, experts_implementation="moekit")
    return model.to(device), tokenizer, num_experts, top_k


def expert_targets(moe_dir: Path, labels: list[str], num_experts: int) -> dict[str, list[int]]:
    """label -> indices of the experts built from that label's source model, from `moekit_config.yaml`.

    A label names a source by its directory name or one of the '-'/'_'-separated words of it ('code' names
    `models/smollm2-code`); it must name exactly one source (the experts copied from it are all its targets).
    """
    recipe = moe_dir / "moekit_config.yaml"
    if not recipe.is_file():
        raise UserError(
            f"{moe_dir}: no moekit_config.yaml, so the label objective cannot tell which expert each label's source "
            "became; use --objective lm, or calibrate a clown-MoE built by moekit"
        )
    config = yaml.safe_load(recipe.read_text()) or {}
    experts = config.get("experts") if isinstance(config, dict) else None
    if not isinstance(experts, list) or len(experts) != num_experts:
        raise UserError(
            f"{recipe}: 'experts' does not list the model's {num_experts} experts (an upcycle has one source for "
            "all of them); the label objective needs a clown-MoE: use --objective lm"
        )
    sources = [str((e or {}).get("source_model", "")) for e in experts]
    names: dict[str, set[str]] = {}
    for source in dict.fromkeys(sources):
        leaf = Path(source).name
        for name in {leaf, *re.split(r"[-_]", leaf)}:
            names.setdefault(name, set()).add(source)
    targets = {}
    for label in labels:
        matched = names.get(label, set())
        if len(matched) != 1:
            known = sorted(n for n, s in names.items() if len(s) == 1)
            why = (
                "names several sources" if matched else f"names no expert source{did_you_mean(label, known)}"
            )
            raise UserError(
                f"--data {label}=...: label '{label}' {why}; the experts are built from "
                f"{', '.join(dict.fromkeys(sources))}: name a label after one of them (e.g. {known[-1] if known else '?'})"
            )
        (source,) = matched
        targets[label] = [e for e, s in enumerate(sources) if s == source]
    return targets


def _windows(data, heldout, tokenizer, window, heldout_fraction):
    """(train, held-out) token windows per label."""
    if not data:
        raise UserError("no --data given: pass LABEL=FILE at least once")
    train, held = {}, {}
    for label, value in data.items():
        windows = token_windows(_texts(label, value), tokenizer, window, None)
        if heldout is None:
            if len(windows) < 2:
                raise UserError(
                    f"--data {label}=...: {len(windows)} window(s) of {window} tokens, too few to hold some out; "
                    "give more text or --heldout"
                )
            cut = max(1, round(len(windows) * heldout_fraction))
            windows, held[label] = windows[:-cut], windows[-cut:]
        train[label] = windows
    if heldout is not None:
        for label, value in heldout.items():
            if label not in data:
                raise UserError(
                    f"--heldout {label}=...: label '{label}' has no --data{did_you_mean(label, data)}"
                )
            held[label] = token_windows(_texts(label, value), tokenizer, window, None)
        missing = [label for label in data if label not in held]
        if missing:
            raise UserError(f"--heldout: no held-out data for label(s) {', '.join(missing)}")
    return train, held


def _texts(label: str, value) -> tuple[str, ...]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(label)):
        raise UserError(f"data label {label!r} must be letters, digits, '_', '-' or '.' (LABEL=FILE)")
    if isinstance(value, (str, Path)):
        return read_prompts_file(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) for t in value):
        return tuple(value)
    raise UserError(f"data for label '{label}' must be a text file or a list of strings")


def _origin(value) -> str:
    return str(value) if isinstance(value, (str, Path)) else f"<{len(value)} texts>"


def _trainable(model, train_shared_gate: bool) -> dict[int, dict[str, torch.nn.Parameter]]:
    """layer -> {'router': weight, 'shared_gate': weight}; every other parameter is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    params: dict[int, dict[str, torch.nn.Parameter]] = {}
    for name, module in model.named_modules():
        if m := ROUTER_MODULE.search(name):
            params.setdefault(int(m[1]), {})["router"] = module.weight
        elif train_shared_gate and (m := re.search(r"layers\.(\d+)\.mlp\.shared_expert_gate$", name)):
            params.setdefault(int(m[1]), {})["shared_gate"] = module.weight
    if train_shared_gate and not any("shared_gate" in p for p in params.values()):
        raise UserError("--train-shared-gate: this model has no shared expert (only Qwen2-MoE has one)")
    for group in params.values():
        for p in group.values():
            p.requires_grad_(True)
    return params


def _label_loss(router_logits, target_mask: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Mean over layers and labelled tokens of -log(sum of the router probabilities on the token's targets)."""
    total = 0.0
    for logits in router_logits:
        logp = torch.log_softmax(logits.float(), dim=-1)
        picked = torch.logsumexp(logp.masked_fill(~target_mask, float("-inf")), dim=-1)
        total = total - picked[labelled].mean()
    return total / len(router_logits)


@contextlib.contextmanager
def _straight_through_routing(model):
    """Routers return all experts, weighted `top-k weights + p - p.detach()` (p: the full softmax).

    The forward value is the top-k routing itself, so the MoE output and the loss are the model's at inference;
    the gradient reaching the router logits is that of the dense mixture sum_e p_e * expert_e(x): an unselected
    expert's output, weighted 0 in the forward pass, still says whether choosing it would have lowered the loss.
    """

    def route_through_all(module, args, output):
        if not (isinstance(output, tuple) and len(output) == 3):
            raise UserError(
                f"--objective lm/both: the router {type(module).__name__} does not return (logits, weights, indices) "
                "as Mixtral's and Qwen2-MoE's do; use --objective label"
            )
        logits, weights, indices = output
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.zeros_like(probs).scatter(-1, indices, weights.detach().float())
        every = torch.arange(probs.shape[-1], device=indices.device).expand_as(probs)
        return logits, (chosen + probs - probs.detach()).to(weights.dtype), every

    handles = [
        module.register_forward_hook(route_through_all)
        for name, module in model.named_modules()
        if ROUTER_MODULE.search(name)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _forward(model, ids, mask, lm: bool):
    out = model(
        input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False,
        logits_to_keep=0 if lm else 1,
    )  # fmt: skip
    return out.logits, out.router_logits


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose input and target are real tokens."""
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    return torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep])


def _train(
    model, train, targets, params, steps, lr, objective, coefs, batch_size, seed, top_k, num_experts, progress,
) -> list[float]:  # fmt: skip
    label_coef, balance_coef, z_coef = coefs
    pool = [(label, w) for label, windows in train.items() for w in windows]
    if steps == 0:
        return []
    if not pool:
        raise UserError("the --data files give no training windows")
    optimiser = torch.optim.AdamW([p for g in params.values() for p in g.values()], lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    queue: list = []
    labels = list(train)
    label_ids = {label: i for i, label in enumerate(labels)}
    device = next(model.parameters()).device
    model.train()
    losses = []
    with progress_bar("calibrating", steps, progress, "steps", loss="-") as advance:
        for _ in range(steps):
            batch = []
            while len(batch) < batch_size:
                if not queue:
                    queue = pool[:]
                    order.shuffle(queue)
                batch.append(queue.pop())
            row_labels = [label_ids[label] for label, _ in batch]
            ids, mask = _padded([w for _, w in batch])
            ids, mask = ids.to(device), mask.to(device)
            lm = objective != "label"
            with _straight_through_routing(model) if lm else contextlib.nullcontext():
                logits, router_logits = _forward(model, ids, mask, lm)
            token_mask = mask.reshape(-1).bool()
            router_logits = [r.reshape(-1, num_experts)[token_mask] for r in router_logits]
            loss = 0.0
            if objective in ("lm", "both"):
                loss = loss + _lm_loss(logits, ids, mask)
            if objective in ("label", "both"):
                target_mask, labelled = _token_targets(row_labels, labels, targets, mask, num_experts)
                loss = loss + label_coef * _label_loss(
                    router_logits, target_mask[token_mask], labelled[token_mask]
                )
            for r in router_logits:
                chosen = torch.topk(r.detach().float(), top_k, dim=-1).indices
                loss = loss + (
                    balance_coef * load_balancing_loss(r, chosen) + z_coef * router_z_loss(r)
                ) / len(router_logits)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            advance(loss=f"{losses[-1]:.4f}")
    model.eval()
    return losses


def _padded(windows) -> tuple[torch.Tensor, torch.Tensor]:
    ((ids, mask),) = list(batches(windows, len(windows)))
    return ids, mask


def _token_targets(row_labels, labels, targets, mask, num_experts):
    """[B*S, E] bool: the token's target experts; [B*S] bool: whether the token has a target."""
    rows = mask.shape[0]
    per_row = torch.zeros(rows, num_experts, dtype=torch.bool)
    for r, label_index in enumerate(row_labels):
        per_row[r, targets[labels[label_index]]] = True
    width = mask.shape[1]
    target_mask = per_row[:, None, :].expand(rows, width, num_experts).reshape(-1, num_experts)
    return target_mask.to(mask.device), target_mask.any(dim=-1)


def evaluate(model, held, targets, num_experts: int, top_k: int, batch_size: int) -> Evaluation:
    """Route-stats numbers and perplexity per label on the held-out windows (model in eval mode, no grad)."""
    model.eval()
    device = next(model.parameters()).device
    acc = None
    perplexity = {}
    with torch.inference_mode():
        for label, windows in held.items():
            nll, count = 0.0, 0
            for ids, mask in batches(windows, batch_size):
                ids, mask = ids.to(device), mask.to(device)
                logits, router_logits = _forward(model, ids, mask, lm=True)
                keep = mask.reshape(-1).bool()
                layers = [r.reshape(-1, num_experts)[keep] for r in router_logits]
                if acc is None:
                    acc = RoutingAccumulator(len(layers), num_experts, top_k)
                acc.add(layers, label)
                real = (mask[:, 1:] * mask[:, :-1]).bool()
                n = int(real.sum())
                nll += float(_lm_loss(logits, ids, mask)) * n
                count += n
            perplexity[label] = math.exp(nll / max(count, 1))
    counts = acc.counts.astype(float)
    max_over_mean = float((counts.max(axis=1) / counts.mean(axis=1)).mean())
    shares = {}
    for label, c in acc.label_counts.items():
        pooled = c.sum(axis=0)
        shares[label] = (
            float(pooled[targets[label]].sum() / pooled.sum()) if label in targets else float("nan")
        )
    mi = specialisation(acc.label_counts).mean_mi_bits if len(acc.label_counts) > 1 else None
    return Evaluation(max_over_mean, shares, mi, perplexity)


def _write(moe_dir, out, model, params, force, settings, before, after) -> None:
    """The output directory: the input's files, router tensors replaced, every other tensor copied byte for byte."""
    from moekit.io.checkpoint import open_tensors

    trained = {}
    for layer, group in params.items():
        trained[f"router:{layer}"] = group["router"].detach().cpu()
        if "shared_gate" in group:
            trained[f"shared:{layer}"] = group["shared_gate"].detach().cpu()
    infos = checkpoint_infos(moe_dir)
    reader = open_tensors(moe_dir)
    planned = [OutputTensor(name, info.dtype, tuple(info.shape)) for name, info in infos.items()]
    with streaming_output(out, force, planned, 2_000_000_000) as (tmp, writer), contextlib.closing(reader):
        for name in infos:
            key = None
            if m := ROUTER_ON_DISK.fullmatch(name):
                key = f"router:{m[1]}"
            elif m := SHARED_GATE_ON_DISK.fullmatch(name):
                key = f"shared:{m[1]}"
            tensor = trained[key].to(infos[name].dtype) if key in trained else reader.read(name)
            writer.write(name, tensor, True)
        for f in moe_dir.iterdir():
            if (
                f.is_file()
                and not f.name.endswith(".safetensors")
                and f.name != "model.safetensors.index.json"
            ):
                shutil.copyfile(f, tmp / f.name)
        record = {"settings": settings, "before": before.__dict__, "after": after.__dict__}
        (tmp / "moekit_calibration.json").write_text(json.dumps(record, indent=2) + "\n")
        card = tmp / "README.md"
        text = card.read_text() if card.is_file() else ""
        card.write_text(
            text.split(CARD_HEADING)[0].rstrip() + "\n\n" + _card_section(settings, before, after)
        )


def comparison_rows(before: Evaluation, after: Evaluation) -> list[tuple[str, str, str]]:
    """(metric, before, after) rows of the side-by-side report."""
    rows = [("load max/mean (1 = balanced)", f"{before.max_over_mean:.3f}", f"{after.max_over_mean:.3f}")]
    for label in before.intended_share:
        b, a = before.intended_share[label], after.intended_share[label]
        if not math.isnan(b):
            rows.append((f"{label} tokens to the {label} expert", f"{b:.1%}", f"{a:.1%}"))
    if before.mutual_information_bits is not None:
        rows.append(
            (
                "mutual information (bits)",
                f"{before.mutual_information_bits:.3f}",
                f"{after.mutual_information_bits:.3f}",
            )
        )
    for label in before.perplexity:
        rows.append(
            (
                f"held-out {label} perplexity",
                f"{before.perplexity[label]:.2f}",
                f"{after.perplexity[label]:.2f}",
            )
        )
    return rows


def _card_section(settings, before, after) -> str:
    table = "| held-out | before | after |\n|---|---:|---:|\n" + "".join(
        f"| {m} | {b} | {a} |\n" for m, b, a in comparison_rows(before, after)
    )
    shown = {k: v for k, v in settings.items() if k != "targets"}
    return (
        f"{CARD_HEADING}\n\nOnly the router weights were trained; every other tensor is the input's, byte for "
        f"byte. Label -> expert: {settings['targets'] or 'none (lm objective)'}.\n\n"
        f"```yaml\n{yaml.safe_dump(shown, sort_keys=False)}```\n\n{table}"
    )
