"""Run an MoE model over token windows and stream each layer's router logits into a `RoutingAccumulator`.

Two ways to get the logits, both giving one [tokens, E] tensor per MoE layer for each batch:
* `output_router_logits=True` on the model's forward (Mixtral, Qwen2-MoE and Qwen3-MoE support it);
* forward hooks on the router modules, for models whose forward does not return them.
Only one batch's logits live at a time; padding positions are dropped using the attention mask.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from moekit import transformers_io
from moekit.errors import UserError
from moekit.stats.accumulate import NonFiniteRouting, RoutingAccumulator
from moekit.stats.outputs import check_model_dir

# The router of MoE layer N: `block_sparse_moe.gate` (Mixtral on disk and in transformers 4.x, PhiMoE),
# `mlp.gate` (transformers 5 Mixtral, Qwen-MoE, OLMoE, DeepSeek, ERNIE), `mlp.router` (GPT-OSS),
# `block_sparse_moe.router` (GraniteMoE), `feed_forward.router` (Jamba-like). The `$` leaves out
# Qwen2-MoE's `shared_expert_gate`.
ROUTER_NAME = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(?:block_sparse_moe|mlp|feed_forward|moe|ffn)\.(?:gate|router)$"
)

# Config attributes that hold the expert count and the experts per token, by model family.
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "top_k")

# Families whose forward returns the raw router logits with output_router_logits; the others are read by hooks.
SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
# The statistics pick the top-k of the router logits. Routers that choose otherwise are refused, with why.
_SELECTION_NOT_MODELLED = {
    "n_group": "routes within expert groups (n_group > 1), which route-stats does not model",
}


def moe_shape(config) -> tuple[int, int]:
    """(num_experts, top_k) from a transformers config; UserError for a dense or an unsupported MoE model."""
    name = getattr(config, "_name_or_path", "") or "the model"
    archs = ",".join(getattr(config, "architectures", None) or [config.model_type])
    experts = next((getattr(config, key) for key in _EXPERT_COUNT_KEYS if getattr(config, key, None)), None)
    top_k = next(
        (getattr(config, key) for key in _TOP_K_KEYS if isinstance(getattr(config, key, None), int)), None
    )
    if not experts or not top_k:
        raise UserError(
            f"{name} is a dense model ({archs}): route-stats needs an MoE checkpoint such as Mixtral, "
            "Qwen2-MoE or Qwen3-MoE"
        )
    groups = getattr(config, "n_group", None)
    if isinstance(groups, int) and groups > 1 and getattr(config, "topk_group", groups) < groups:
        raise UserError(
            f"{name} is a {config.model_type} MoE ({archs}) that {_SELECTION_NOT_MODELLED['n_group']}"
        )
    if top_k > experts:
        raise UserError(
            f"{name}: num_experts_per_tok is {top_k} but the model has only {experts} experts; fix config.json"
        )
    return int(experts), int(top_k)


def find_routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, router module) for every MoE layer, in layer order."""
    found = []
    for name, module in model.named_modules():
        match = ROUTER_NAME.search(name)
        if match:
            found.append((int(match.group(1)), module))
    return sorted(found, key=lambda pair: pair[0])


def _check_selection_is_top_k(model: torch.nn.Module) -> None:
    """Refuse routers whose choice adds a learned correction bias to the scores (DeepSeek-V3, GLM-4-MoE, ERNIE):
    the top-k of the logits would not be the experts the model runs."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if name.endswith("e_score_correction_bias") and bool((tensor != 0).any()):
            raise UserError(
                f"{type(model).__name__} picks experts by router scores plus a correction bias ('{name}'), which "
                "route-stats does not model; its counts would not be the experts the model runs"
            )


def router_weights(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [experts, hidden], bias) of a router module: its own, or its one linear child's (GraniteMoE's
    `router.layer`, HunYuan's `gate.wg`)."""
    for sub in (module, *module.children()):
        weight = getattr(sub, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            bias = getattr(sub, "bias", None)
            return weight, bias if isinstance(bias, torch.Tensor) else None
    raise UserError(f"router {type(module).__name__} has no [experts, hidden] weight to read its logits from")


def load_config(path: str | Path):
    """The transformers config of a local model directory, checked to be an MoE route-stats can model."""
    path = check_model_dir(path)
    try:
        config = transformers_io.load_config(path)
    except (OSError, ValueError) as err:  # unreadable JSON, unknown model_type, or remote code needed
        raise UserError(
            f"{path}/config.json: transformers cannot load it ({str(err).splitlines()[0]})"
        ) from err
    moe_shape(config)
    return config


def load_model(
    path: str | Path, config, device: str, allow_pickle: bool = False
) -> tuple[torch.nn.Module, object]:
    """(model in eval mode on `device`, tokenizer) from a local transformers directory whose `config` is loaded.

    fp32 on the CPU (exact routing, and bf16 GEMMs are slow on CPUs without bf16 units); bf16 on CUDA.
    Never runs remote code and never reaches the hub. The weights pass merge's checks first (safetensors headers,
    index names inside the directory, config against tensors), and pickled weights are refused unless
    `allow_pickle`, since transformers would otherwise fall back to torch.load. A checkpoint that does not fill
    the model its config describes is refused: transformers would fill the gaps with random values.
    """
    from moekit.io.checkpoint import Checkpoint

    path = Path(path)
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    Checkpoint.open(str(path), where=str(path), allow_pickle=allow_pickle).tensors.close()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    try:
        tokenizer = transformers_io.load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: no usable tokenizer files ({str(err).splitlines()[0]})") from err
    try:
        with (
            _transformers_quiet()
        ):  # its multi-line load report; what matters in it is raised below in one line
            model, info = transformers_io.load_model(
                path, config=config, dtype=dtype,
                use_safetensors=None if allow_pickle else True, weights_only=True,
                ignore_mismatched_sizes=True, output_loading_info=True,
            )  # fmt: skip
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: transformers cannot load the model ({str(err).splitlines()[0]})") from err
    _check_loading_info(path, type(model).__name__, info)
    return model.to(device).eval(), tokenizer


def _check_loading_info(path: Path, model_class: str, info: dict) -> None:
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    if mismatched:
        key, stored, expected = mismatched[0]
        raise UserError(
            f"{path}: tensor '{key}' is {list(stored)} in the weights but config.json implies {list(expected)} "
            f"({len(mismatched)} such tensors); the checkpoint does not match its config (e.g. its expert count): "
            "fix config.json or re-download the model"
        )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise UserError(
            f"{path}: the weights lack {len(missing)} tensor(s) that {model_class} needs (first: '{missing[0]}'); "
            "transformers would fill them with random values: the checkpoint is incomplete"
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        logging.getLogger("moekit").warning(
            "%s: %d tensor(s) in the weights are not used by %s (first: '%s')",
            path, len(unexpected), model_class, unexpected[0],
        )  # fmt: skip
    if info.get("error_msgs"):
        raise UserError(
            f"{path}: transformers cannot load the weights ({info['error_msgs'][0].splitlines()[0]})"
        )


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    hf_logger = logging.getLogger("transformers")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logger.setLevel(level)


def batches(windows: Sequence[Sequence[int]], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches, longest windows first so each batch pads little.

    Padding goes on the right: under causal attention real tokens never see it, and its positions are masked
    out of the statistics. Pad id 0 is arbitrary for the same reason.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    ordered = sorted(windows, key=len, reverse=True)
    for start in range(0, len(ordered), batch_size):
        group = ordered[start : start + batch_size]
        width = len(group[0])
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, window in enumerate(group):
            ids[row, : len(window)] = torch.tensor(window, dtype=torch.long)
            mask[row, : len(window)] = 1
        yield ids, mask


def router_logits_reader(model: torch.nn.Module, method: str) -> Callable:
    """A function (input_ids, attention_mask) -> list of [B*S, E] router logits, one per MoE layer."""
    routers = find_routers(model)
    if method == "output_router_logits":

        def from_outputs(ids, mask):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                output_router_logits=True,
                use_cache=False,
                logits_to_keep=1,
            )
            logits = getattr(out, "router_logits", None)
            if logits is None or len(logits) != len(routers):
                raise RuntimeError(
                    f"output_router_logits returned {None if logits is None else len(logits)} layers, "
                    f"expected {len(routers)}; use method='hooks'"
                )
            return list(logits)

        return from_outputs
    if method != "hooks":
        raise UserError(
            f"unknown collection method {method!r}: use 'auto', 'output_router_logits' or 'hooks'"
        )

    weights = [router_weights(module) for _, module in routers]

    def from_hooks(ids, mask):
        captured: list[torch.Tensor | None] = [None] * len(routers)

        def keeper(slot):
            def hook(module, inputs, output):
                # Routers return different things per family (logits, scores, indices, sorted gates); their input
                # and their [experts, hidden] weight give the raw logits for all of them.
                weight, bias = weights[slot]
                hidden = inputs[0].reshape(-1, weight.shape[1])
                captured[slot] = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias)

            return hook

        handles = [module.register_forward_hook(keeper(slot)) for slot, (_, module) in enumerate(routers)]
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
        if any(c is None for c in captured):
            raise RuntimeError("a router module did not run during the forward pass")
        return captured

    return from_hooks


def collect(
    model: torch.nn.Module,
    labelled_windows: Sequence[tuple[str | None, Sequence[Sequence[int]]]],
    *,
    top_k: int,
    num_experts: int,
    batch_size: int = 8,
    method: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> RoutingAccumulator:
    """Accumulate routing over every (label, windows) group; `progress(tokens)` is called after each batch."""
    routers = find_routers(model)
    if not routers:
        raise UserError(
            f"no router modules found in {type(model).__name__} (looked for layers.N.mlp.gate / "
            "layers.N.block_sparse_moe.gate): supported families are Mixtral, Qwen2-MoE and Qwen3-MoE"
        )
    _check_selection_is_top_k(model)
    if method == "auto":
        native = model.config.model_type in SUPPORTED_MODEL_TYPES and hasattr(
            model.config, "output_router_logits"
        )
        method = "output_router_logits" if native else "hooks"
    read_logits = router_logits_reader(model, method)
    accumulator = RoutingAccumulator(len(routers), num_experts, top_k)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for label, windows in labelled_windows:
            for ids, mask in batches(windows, batch_size):
                keep = mask.reshape(-1).bool().to(device)
                logits = read_logits(ids.to(device), mask.to(device))
                try:
                    accumulator.add([layer.reshape(-1, num_experts)[keep] for layer in logits], label)
                except NonFiniteRouting as err:
                    raise UserError(_non_finite_message(model, routers[err.layer], err)) from None
                if progress is not None:
                    progress(int(keep.sum()))
    return accumulator


def _non_finite_message(
    model: torch.nn.Module, router: tuple[int, torch.nn.Module], err: NonFiniteRouting
) -> str:
    """Say which router went NaN, and whether its own weights or the hidden states reaching it are to blame."""
    layer, module = router
    prefix = next(name for name, m in model.named_modules() if m is module)
    bad_weights = [f"{prefix}.{name}" for name, p in module.named_parameters() if not torch.isfinite(p).all()]
    cause = (
        f"tensor '{bad_weights[0]}' holds NaN or Inf values"
        if bad_weights
        else "the hidden states reaching it are not finite (NaN/Inf weights in an earlier layer, or an overflow)"
    )
    return (
        f"the router of MoE layer {layer} gives NaN probabilities for {err.bad_tokens} of the {err.tokens} tokens of a batch: "
        f"{cause}; routing statistics of such a model mean nothing, so none are written: fix the model"
    )
