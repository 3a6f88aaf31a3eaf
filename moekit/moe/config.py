"""MoE build configs: mergekit-moe's YAML unchanged, the same under `merge_method: moe`, and sparse upcycling.

mergekit-moe validates little (a typo'd key is ignored, a missing prompt is found after the model is loaded);
here every key is checked with a suggestion, and every check that needs no model file runs before any is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.config import check_keys, fits_float32, parse_dtype
from moekit.errors import UserError, did_you_mean
from moekit.moe.layouts import LAYOUTS, NOT_BUILT, architecture_names

if TYPE_CHECKING:  # the keys and checks here need no torch: moekit/preflight.py reads them before its import
    import torch

MOE_KEYS = {
    "merge_method": "moe (optional: a config with `experts` is an MoE config)",
    "base_model": "the model that gives attention, norms, embeddings and lm_head",
    "experts": "list of {source_model, positive_prompts, negative_prompts, noise_scale, residual_scale}",
    "gate_mode": "hidden, hidden_avg, cheap_embed, random or uniform_random",
    "experts_per_token": "experts each token is routed to (default 2)",
    "shared_experts": "one shared expert, for Qwen2-MoE",
    "architecture": "the MoE output: "
    + ", ".join(layout.name for layout in LAYOUTS)
    + " (mergekit: qwen, qwen3)",
    "dtype": "dtype of the output tensors (default: the base model's)",
    "gate_dtype": "dtype the base runs in for hidden gates (moekit; default float32, mergekit: bfloat16)",
    "tokenizer_source": "base: use the base's tokenizer even when an expert's vocabulary differs",
    "upcycle": "moekit: {num_experts, noise_scale, prompts}: N copies of the base's MLP",
    "out": "output directory (moekit)",
    "name": "a name for the model card (moekit)",
}
MAX_EXPERTS = (
    4096  # real MoEs have 8 to 512; a plan of millions of experts would only exhaust memory and disk
)
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
UPCYCLE_KEYS = {"num_experts", "noise_scale", "prompts"}
UPCYCLE_PROMPT_KEYS = {"positive_prompts", "negative_prompts"}

PROMPT_GATE_MODES = ("hidden", "hidden_avg", "cheap_embed")
GATE_MODES = (*PROMPT_GATE_MODES, "random", "uniform_random")
GATE_MODE_ALIASES = {"hidden_last": "hidden"}  # mergekit accepts both spellings for the last-token mode

# mergekit picks an output architecture whose display name starts with `architecture:` ("Mixtral", "Qwen MoE",
# "Qwen3 MoE"); "qwen" therefore means "a Qwen MoE that fits the sources". The spellings live with the layouts.


@dataclass(frozen=True)
class ExpertSpec:
    """One expert: whose MLP it copies, the prompts its router vector comes from, and mergekit's noise/scale."""

    source: str
    positive_prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    noise_scale: float | None
    residual_scale: float | None
    where: str

    @property
    def prompt_key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return self.positive_prompts, self.negative_prompts


@dataclass
class MoEConfig:
    """A validated MoE build config. Upcycling configs are expanded here into N experts of the base."""

    base_model: str
    experts: list[ExpertSpec]
    shared_experts: list[ExpertSpec]
    gate_mode: str
    experts_per_token: int
    architecture: tuple[str, ...] | None  # candidate layout names, None = infer from the sources
    dtype: torch.dtype | None
    gate_dtype: torch.dtype
    tokenizer_source: str | None
    upcycle: bool
    out: str | None
    name: str | None
    raw: dict
    path: Path | None

    @property
    def base_dir(self) -> Path | None:
        return self.path.parent if self.path else None

    @property
    def is_prompt_gated(self) -> bool:
        return self.gate_mode in PROMPT_GATE_MODES

    def shared_gate_is_zero(self, shared: list[ExpertSpec]) -> bool:
        """Whether the shared expert `shared[0]` gets a zero gate: sigmoid(0 . x) = 1/2 for every token.

        Upcycling uses it for exactness (layouts.py); a shared expert without prompts under a prompt-based gate mode
        gets it too (mergekit refuses that config; a constant half-weight shared expert is the natural reading).
        """
        if not shared:
            return False
        return self.upcycle or (self.is_prompt_gated and not shared[0].positive_prompts)


def parse_moe_config(raw: dict, path: Path | None = None) -> MoEConfig:
    """Validate an MoE config: keys, types, gate mode, expert counts and prompts. Model files are not opened."""
    name = str(path) if path else "<config>"
    check_keys(raw, MOE_KEYS, name)
    if raw.get("merge_method", "moe") != "moe":
        raise UserError(f"{name}: merge_method {raw['merge_method']!r} with MoE keys; use merge_method: moe")
    base_model = _string(raw.get("base_model"), f"{name}: base_model", "a path to the base model's directory")

    mode = raw.get("gate_mode", "hidden")
    mode = GATE_MODE_ALIASES.get(mode, mode) if isinstance(mode, str) else mode
    if mode not in GATE_MODES:
        raise UserError(
            f"{name}: gate_mode {mode!r} is unknown{did_you_mean(str(mode), GATE_MODES)}; use one of {', '.join(GATE_MODES)}"
        )

    k = raw.get("experts_per_token", 2)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UserError(f"{name}: experts_per_token must be an integer >= 1, got {k!r}")

    upcycle = raw.get("upcycle") is not None
    if upcycle:
        if raw.get("experts") is not None or raw.get("shared_experts") is not None:
            raise UserError(
                f"{name}: 'upcycle' makes the experts from base_model; remove 'experts' and 'shared_experts' "
                "(or remove 'upcycle' to build a clown-MoE from the listed experts)"
            )
        experts = _parse_upcycle(raw["upcycle"], base_model, mode, f"{name}: upcycle")
        shared: list[ExpertSpec] = []
    else:
        if raw.get("experts") is None:
            raise UserError(
                f"{name}: missing 'experts' (a list of {{source_model, positive_prompts}}), or use 'upcycle'"
            )
        experts = [
            _parse_expert(e, f"{name}: experts[{i}]")
            for i, e in enumerate(_list(raw["experts"], f"{name}: experts"))
        ]
        shared_raw = raw.get("shared_experts")
        shared = [] if shared_raw is None else [
            _parse_expert(e, f"{name}: shared_experts[{i}]") for i, e in enumerate(_list(shared_raw, f"{name}: shared_experts"))
        ]  # fmt: skip
        if len(shared) > 1:
            raise UserError(
                f"{name}: shared_experts has {len(shared)} entries; Qwen2-MoE takes exactly one shared expert"
            )

    if len(experts) < k:
        raise UserError(
            f"{name}: {len(experts)} expert(s) but experts_per_token is {k}; add experts or lower experts_per_token"
        )
    if mode in PROMPT_GATE_MODES and not upcycle:
        _check_prompts(experts, mode, name)
        if shared and shared[0].negative_prompts and not shared[0].positive_prompts:
            raise UserError(
                f"{shared[0].where}: negative_prompts without positive_prompts; add positive_prompts"
            )

    architecture = raw.get("architecture")
    candidates = None
    if architecture is not None:
        key = str(architecture).strip().lower()
        if key in NOT_BUILT:
            raise UserError(f"{name}: architecture {architecture!r} is not built: {NOT_BUILT[key][1]}")
        names = architecture_names()  # at call time, as the layouts are data
        if key not in names:
            raise UserError(
                f"{name}: architecture {architecture!r} is not supported{did_you_mean(key, names)}; "
                f"use one of {', '.join(layout.name for layout in LAYOUTS)}"
            )
        candidates = names[key]

    tokenizer_source = raw.get("tokenizer_source")
    if tokenizer_source is not None and tokenizer_source != "base":
        raise UserError(
            f"{name}: tokenizer_source {tokenizer_source!r}: an MoE takes its embeddings from base_model, so only "
            "'tokenizer_source: base' is possible"
        )
    for key in ("out", "name"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise UserError(f"{name}: '{key}' must be a string, got {raw[key]!r}")

    return MoEConfig(
        base_model=base_model,
        experts=experts,
        shared_experts=shared,
        gate_mode=mode,
        experts_per_token=k,
        architecture=candidates,
        dtype=parse_dtype(raw.get("dtype"), f"{name}: dtype"),
        gate_dtype=parse_dtype(raw.get("gate_dtype", "float32"), f"{name}: gate_dtype"),
        tokenizer_source=tokenizer_source,
        upcycle=upcycle,
        out=raw.get("out"),
        name=raw.get("name"),
        raw=raw,
        path=path,
    )


def _check_prompts(experts: list[ExpertSpec], mode: str, name: str) -> None:
    for e in experts:
        if not e.positive_prompts:
            raise UserError(
                f"{e.where}: no positive_prompts, but gate_mode {mode} builds each router vector from the expert's "
                "prompts; add positive_prompts or use gate_mode: random / uniform_random"
            )
        if e.negative_prompts and sorted(e.negative_prompts) == sorted(e.positive_prompts):
            raise UserError(
                f"{e.where}: negative_prompts are the positive_prompts, so they cancel and the router vector is zero; "
                "give negative_prompts that describe what this expert should not get, or remove them"
            )
    if len(experts) > 1 and all(e.prompt_key == experts[0].prompt_key for e in experts[1:]):
        raise UserError(
            f"{name}: every expert has the same prompts, so gate_mode {mode} gives every expert the same router "
            "vector and the router cannot tell them apart; give each expert prompts that describe what it should get"
        )


def _parse_expert(entry: object, where: str) -> ExpertSpec:
    check_keys(entry, EXPERT_KEYS, where)
    return ExpertSpec(
        source=_string(entry.get("source_model"), f"{where}.source_model", "a path to a model directory"),
        positive_prompts=_prompts(entry.get("positive_prompts"), f"{where}.positive_prompts"),
        negative_prompts=_prompts(entry.get("negative_prompts"), f"{where}.negative_prompts"),
        noise_scale=_number(entry.get("noise_scale"), f"{where}.noise_scale", nonnegative=True),
        residual_scale=_number(entry.get("residual_scale"), f"{where}.residual_scale"),
        where=where,
    )


def _parse_upcycle(entry: object, base_model: str, mode: str, where: str) -> list[ExpertSpec]:
    check_keys(entry, UPCYCLE_KEYS, where)
    n = entry.get("num_experts")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"{where}.num_experts must be an integer >= 1, got {n!r}")
    if n > MAX_EXPERTS:
        raise UserError(
            f"{where}.num_experts is {n}, more than any MoE has (moekit builds at most {MAX_EXPERTS} experts)"
        )
    noise = _number(entry.get("noise_scale"), f"{where}.noise_scale", nonnegative=True)
    prompts_raw = entry.get("prompts")
    if mode in PROMPT_GATE_MODES:
        if prompts_raw is None:
            raise UserError(
                f"{where}: gate_mode {mode} needs prompts for each of the {n} experts (upcycle.prompts: a list of "
                "{positive_prompts, negative_prompts}); or use gate_mode: random / uniform_random"
            )
    elif prompts_raw is not None:
        raise UserError(
            f"{where}.prompts: gate_mode {mode} does not use prompts; remove them or use gate_mode: hidden"
        )
    entries = _list(prompts_raw, f"{where}.prompts") if prompts_raw is not None else [{}] * n
    if len(entries) != n:
        raise UserError(
            f"{where}.prompts has {len(entries)} entries for num_experts {n}; give one per expert"
        )
    experts = []
    for i, p in enumerate(entries):
        pwhere = f"{where}.prompts[{i}]"
        check_keys(p, UPCYCLE_PROMPT_KEYS, pwhere)
        experts.append(
            ExpertSpec(
                source=base_model,
                positive_prompts=_prompts(p.get("positive_prompts"), f"{pwhere}.positive_prompts"),
                negative_prompts=_prompts(p.get("negative_prompts"), f"{pwhere}.negative_prompts"),
                noise_scale=noise,
                residual_scale=None,
                where=pwhere if prompts_raw is not None else f"{where} (expert {i})",
            )
        )
    if mode in PROMPT_GATE_MODES:
        _check_prompts(experts, mode, where)
    return experts


def _list(value: object, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: expected a non-empty list, got {value!r}")
    return value


def _string(value: object, where: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: expected {what}, got {value!r}")
    return value


def _prompts(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise UserError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(value)


def _number(value: object, where: str, nonnegative: bool = False) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise UserError(f"{where}: expected a number, got {value!r}")
    if not fits_float32(value):
        raise UserError(f"{where}: must be a finite number within float32's range (±3.4e38), got {value}")
    if nonnegative and value < 0:
        raise UserError(f"{where}: must be >= 0, got {value}")
    return float(value)
