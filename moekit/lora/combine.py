"""Several LoRA adapters merged into one, with the semantics of PEFT's `add_weighted_adapter`.

Per module, over the adapters that have it (with weight w and scale s = alpha/r):
- linear, ties, dare_linear, dare_ties, magnitude_prune: the method is applied to the A factors with weights
  sign(w)·sqrt(|w·s|) and to the B factors with sqrt(|w·s|), separately (cheap; B·A is then only roughly the
  weighted sum of the updates, as PEFT warns). All adapters must have the same rank.
- cat: A = [w₁s₁A₁; w₂s₂A₂; ...], B = [B₁ B₂ ...]: exactly Σ wᵢsᵢBᵢAᵢ, at rank Σ rᵢ.
- svd and the *_svd variants: the method is applied to the full updates sᵢBᵢAᵢ with weights w, and the result is
  truncated by SVD to `svd_rank` (default: the largest rank), optionally clamped at the `svd_clamp` quantile.
The merged adapter has alpha = r, so its scale is 1. DARE's random masks come from a generator seeded by
`seed` and the module's name, so a run is reproducible and does not depend on module order (PEFT draws from the
global torch RNG, so its masks differ from these while following the same distribution).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.errors import UserError, did_you_mean
from moekit.io.output_dir import atomic_output_dir, check_output_free, check_output_spares_inputs
from moekit.io.output_files import write_recipe
from moekit.lora.adapter import PREFIX, LoraAdapter, LoraFactors, open_adapter
from moekit.lora.adapter_writer import AdapterWriter
from moekit.paths import expand_path

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = (*FACTOR_METHODS, "cat", *SVD_METHODS)
CONFIG_KEYS = (
    "adapters",
    "combination_type",
    "density",
    "majority_sign_method",
    "svd_rank",
    "svd_clamp",
    "out",
)


@dataclass(frozen=True)
class CombineOptions:
    combination_type: str = "svd"
    density: float | None = None
    majority_sign_method: str = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    seed: int = 0


# --- the task-tensor methods of PEFT's merge_utils, on a list of same-shape tensors -----------------------------


def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return tensors * weights.view(-1, *([1] * (tensors.dim() - 1)))


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    keep = torch.zeros(t.numel(), dtype=t.dtype)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
    return t * keep.reshape(t.shape)


def _random_prune(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def _elect_and_merge(stacked: torch.Tensor, weights: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES: keep the entries that agree with the majority sign (of the sum, or by count), average them."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(votes >= 0, 1, -1)
    return (_weighted(stacked, weights) * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


def combine_tensors(
    method: str, tensors: list[torch.Tensor], weights: torch.Tensor, options: CombineOptions, generator
) -> torch.Tensor:
    """One of linear / ties / dare_linear / dare_ties / magnitude_prune over `tensors` (the *_svd base names)."""
    density = options.density if options.density is not None else 1.0
    prune: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # noqa: E731
    if density < 1 and method in ("ties", "magnitude_prune"):
        prune = lambda t: _magnitude_prune(t, density)  # noqa: E731
    elif density < 1 and method.startswith("dare"):
        prune = lambda t: _random_prune(t, density, generator)  # noqa: E731
    stacked = torch.stack([prune(t) for t in tensors])
    if method in ("ties", "dare_ties"):
        return _elect_and_merge(stacked, weights, options.majority_sign_method)
    return _weighted(stacked, weights).sum(dim=0)


# --- adapters ---------------------------------------------------------------------------------------------------


def _max_rank(adapter: LoraAdapter) -> int:
    return max([int(adapter.config["r"]), *map(int, (adapter.config.get("rank_pattern") or {}).values())])


def check_options(adapters: list[LoraAdapter], options: CombineOptions) -> int:
    """The merged rank; refuses what PEFT refuses (and what moekit does not carry over)."""
    kind = options.combination_type
    if kind not in COMBINATIONS:
        raise UserError(
            f"combination_type '{kind}' is unknown{did_you_mean(kind, COMBINATIONS)}; one of {', '.join(COMBINATIONS)}"
        )
    if options.majority_sign_method not in ("total", "frequency"):
        raise UserError(
            f"majority_sign_method must be 'total' or 'frequency', got {options.majority_sign_method!r}"
        )
    if options.density is not None and not 0 <= options.density <= 1:
        raise UserError(f"density must be in [0, 1], got {options.density}")
    needs_density = kind not in ("linear", "cat", "svd")
    if needs_density and options.density is None and len(adapters) > 1:
        raise UserError(f"combination_type '{kind}' needs a density (the fraction of entries kept)")
    for a in adapters:
        if a.use_dora or a.lora_bias:
            what = "DoRA" if a.use_dora else "lora_bias"
            raise UserError(
                f"{a.path}: merging {what} adapters is not implemented (PEFT does not merge them either)"
            )
    ranks = [_max_rank(a) for a in adapters]
    if kind in FACTOR_METHODS and len(adapters) > 1 and len(set(ranks)) != 1:
        listing = ", ".join(f"{a.path.name}: r={r}" for a, r in zip(adapters, ranks))
        raise UserError(f"combination_type '{kind}' needs adapters of one rank ({listing}); use cat or svd")
    if kind == "cat":
        return sum(ranks)
    if kind in SVD_METHODS:
        if options.svd_rank is not None and options.svd_rank < 1:
            raise UserError(f"svd_rank must be at least 1, got {options.svd_rank}")
        return options.svd_rank or max(ranks)
    return ranks[0]


def _factors(adapter: LoraAdapter, f: LoraFactors) -> tuple[torch.Tensor, torch.Tensor]:
    return adapter.tensors.read(f.a).float(), adapter.tensors.read(f.b).float()


def combine_module(
    module: str,
    present: list[tuple[LoraAdapter, LoraFactors, float]],
    rank: int,
    options: CombineOptions,
    n_adapters: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the merged adapter for one module, from the adapters that have it and their weights.

    As in PEFT, the method applies even where one adapter alone has the module (TIES then still prunes it); only
    a merge of a single adapter is always linear."""
    kind = options.combination_type if n_adapters > 1 else "linear"
    generator = torch.Generator().manual_seed(options.seed * 1_000_003 + zlib.crc32(module.encode()))
    if kind == "cat":
        a = torch.cat([_factors(ad, f)[0] * w * f.scaling for ad, f, w in present], dim=0)
        b = torch.cat([_factors(ad, f)[1] for ad, f, _ in present], dim=1)
        pad = (
            rank - a.shape[0]
        )  # PEFT's merged factors are allocated at the full rank; absent adapters leave 0s
        return torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat(
            [b, b.new_zeros(b.shape[0], pad)], dim=1
        )
    if kind in SVD_METHODS:
        deltas = [(lambda ab, s: ab[1] @ ab[0] * s)(_factors(ad, f), f.scaling) for ad, f, _ in present]
        weights = torch.tensor([w for _, _, w in present])
        merged = combine_tensors(kind.removesuffix("_svd"), deltas, weights, options, generator)
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
        r = min(rank, s.shape[0])
        u, vh = u[:, :r] @ torch.diag(s[:r]), vh[:r]
        if options.svd_clamp is not None:
            high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), options.svd_clamp)
            u, vh = u.clamp(-high, high), vh.clamp(-high, high)
        return vh, u
    scaled = [w * f.scaling for _, f, w in present]
    weights_a = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in scaled])
    weights_b = torch.tensor([math.sqrt(abs(x)) for x in scaled])
    pairs = [_factors(ad, f) for ad, f, _ in present]
    shapes = {(a.shape, b.shape) for a, b in pairs}
    if len(shapes) > 1:
        raise UserError(
            f"module '{module}': the adapters' factors differ in shape {sorted(shapes)}; use cat or svd"
        )
    method = "linear" if kind == "linear" else kind
    a = combine_tensors(method, [p[0] for p in pairs], weights_a, options, generator)
    b = combine_tensors(method, [p[1] for p in pairs], weights_b, options, generator)
    return a, b


def _target_modules(adapters: list[LoraAdapter]) -> list[str] | str:
    targets = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if any(isinstance(t, str) for t in targets):
        raise UserError("the adapters mix a regex target_modules with a list; PEFT cannot merge those either")
    return sorted({m for t in targets for m in (t or [])})


def merge_adapters(
    adapters: list[tuple[str | Path, float]],
    out: str | Path,
    options: CombineOptions | None = None,
    *,
    force: bool = False,
    recipe: dict | None = None,
) -> Path:
    """Merge LoRA adapters (path, weight) into one adapter directory `out`. See the module doc.

    `recipe`, the config that asked for it, is saved with it (moekit_config.yaml and README.md)."""
    options = options or CombineOptions()
    out = Path(out)
    check_output_free(out, force)
    opened = [open_adapter(Path(p)) for p, _ in adapters]
    try:
        check_output_spares_inputs(out, [a.path for a in opened])
        rank = check_options(opened, options)
        weights = [float(w) for _, w in adapters]
        replaced: dict[str, tuple[LoraAdapter, str]] = {}
        for a in opened:
            for target, source in a.replacements.items():
                if target in replaced:
                    raise UserError(
                        f"both {replaced[target][0].path} and {a.path} replace '{target}' (modules_to_save); "
                        "they cannot be merged: drop it from one"
                    )
                replaced[target] = (a, source)
        modules = list(dict.fromkeys(w for a in opened for w in a.factors))
        with atomic_output_dir(out, force) as tmp:
            writer = AdapterWriter(tmp)
            odd: dict[str, int] = {}
            try:
                for weight in modules:
                    present = [
                        (a, a.factors[weight], w) for a, w in zip(opened, weights) if weight in a.factors
                    ]
                    f = present[0][1]
                    a, b = combine_module(f.module, present, rank, options, len(opened))
                    if a.shape[0] != rank:
                        odd[f.module] = int(a.shape[0])
                    kind = (
                        ("lora_embedding_A", "lora_embedding_B")
                        if f.embedding
                        else ("lora_A.weight", "lora_B.weight")
                    )
                    writer.add(f"{PREFIX}{f.module}.{kind[0]}", a.contiguous())
                    writer.add(f"{PREFIX}{f.module}.{kind[1]}", b.contiguous())
                for a, source in replaced.values():
                    writer.add(source, a.tensors.read(source))
                writer.finish(_merged_config(opened, rank, odd))
            except BaseException:
                writer.abort()
                raise
            summary = [
                f"LoRA adapters merged with `{options.combination_type}` (PEFT add_weighted_adapter semantics)"
            ]
            # names, not local paths: the card is for a hub page (the recipe keeps the paths)
            summary += [f"`{a.path.resolve().name}` weight {w}" for a, w in zip(opened, weights)]
            recipe = recipe if recipe is not None else {"adapters": [str(p) for p, _ in adapters]}
            write_recipe(tmp, recipe, "merged LoRA adapter", summary, [], moe=False, model_card=False)
            card = "---\nlibrary_name: peft\ntags:\n- moekit\n- lora\n---\n# merged LoRA adapter\n\n"
            (tmp / "README.md").write_text(card + "\n".join(f"- {line}" for line in summary) + "\n")
    finally:
        for a in opened:
            a.close()
    return out


def _merged_config(adapters: list[LoraAdapter], rank: int, odd: dict[str, int]) -> dict:
    config = dict(adapters[0].config)
    saved = sorted({m for a in adapters for m in (a.config.get("modules_to_save") or [])})
    config.update(
        r=rank,
        lora_alpha=rank,
        rank_pattern=odd,
        alpha_pattern=odd,
        target_modules=_target_modules(adapters),
        modules_to_save=saved or None,
        use_rslora=False,  # alpha = r already makes the scale 1; rsLoRA's alpha/sqrt(r) would not
    )
    return config


def is_adapter_merge_config(raw: dict) -> bool:
    return isinstance(raw, dict) and "adapters" in raw


def merge_adapters_config(
    raw: dict,
    path: Path | None,
    out: str | Path | None,
    *,
    force=False,
    dry_run=False,
    seed=0,
    print_fn=print,
) -> Path | None:
    """`moekit merge` of a config with `adapters:`: validate, then merge (or print the plan for a dry run)."""
    name = str(path) if path else "<config>"
    for key in raw:
        if key not in CONFIG_KEYS:
            raise UserError(
                f"{name}: unknown key '{key}'{did_you_mean(key, CONFIG_KEYS)}; allowed: {', '.join(CONFIG_KEYS)}"
            )
    entries = raw.get("adapters")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{name}: 'adapters' must be a non-empty list of {{adapter: DIR, weight: NUMBER}}")
    base_dir = path.parent if path else None
    adapters = []
    for i, entry in enumerate(entries):
        where = f"{name}: adapters[{i}]"
        if not isinstance(entry, dict) or "adapter" not in entry:
            raise UserError(f"{where}: expected a mapping with 'adapter: DIR' (and optionally 'weight:')")
        for key in entry:
            if key not in ("adapter", "weight"):
                raise UserError(f"{where}: unknown key '{key}'{did_you_mean(key, ('adapter', 'weight'))}")
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise UserError(f"{where}: weight must be a number, got {weight!r}")
        ref = expand_path(str(entry["adapter"]))
        if not ref.is_absolute() and base_dir is not None:
            ref = base_dir / ref
        if not ref.is_dir():
            raise UserError(f"{where}: LoRA adapter '{entry['adapter']}' is not a local directory")
        adapters.append((ref, weight))
    options = CombineOptions(
        combination_type=raw.get("combination_type", "svd"),
        density=raw.get("density"),
        majority_sign_method=raw.get("majority_sign_method", "total"),
        svd_rank=raw.get("svd_rank"),
        svd_clamp=raw.get("svd_clamp"),
        seed=seed,
    )
    if out is None and raw.get("out") is None:
        raise UserError("no output directory: pass -o/--out DIR or set 'out:' in the config")
    target = Path(out) if out is not None else (base_dir or Path()) / str(raw["out"])
    if dry_run:
        opened = [open_adapter(p) for p, _ in adapters]
        try:
            rank = check_options(opened, options)
            modules = {f.module for a in opened for f in a.factors.values()}
        finally:
            for a in opened:
                a.close()
        print_fn(f"plan: {options.combination_type} merge of {len(adapters)} LoRA adapters into '{target}'")
        print_fn(f"  {len(modules)} modules, merged rank {rank}")
        print_fn("dry run: nothing was written")
        return None
    return merge_adapters(adapters, target, options, force=force, recipe=raw)
