"""`route_stats`: prompts in, `RouteStats` out. The CLI and the demo both call this."""

from __future__ import annotations

from pathlib import Path

import torch

from moekit import transformers_io
from moekit._version import __version__
from moekit.errors import UserError
from moekit.progress import progress_bar, transformers_bars
from moekit.stats.collect import collect, find_routers, load_config, load_model, moe_shape
from moekit.stats.experts import expert_names
from moekit.stats.prompts import prompt_sources, token_windows
from moekit.stats.result import RouteStats

DEFAULT_WINDOW = 256


def route_stats(
    model_or_path,
    prompts,
    *,
    tokenizer=None,
    max_tokens: int | None = None,
    window: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    method: str = "auto",
    progress: bool = False,
    allow_pickle: bool = False,
) -> RouteStats:
    """Routing statistics of an MoE model over `prompts`.

    `model_or_path`: a local model directory, or a loaded transformers MoE model (then pass `tokenizer`, or
    the model's `name_or_path` must be a directory holding one). `prompts`: a prompts file, a list of strings,
    or a mapping label -> file or list (labels turn on the specialisation report); see `moekit.stats.prompts`
    for how files are split and windows cut. `max_tokens` caps the tokens taken from each prompt source.
    `window` is the longest window in tokens: DEFAULT_WINDOW, or the model's positions if fewer; a larger
    value than the positions is refused. `method`: 'auto', 'output_router_logits' or 'hooks'. `progress` draws
    a rich progress bar on stderr. `allow_pickle` lets a model with only pickled weights load (transformers
    then uses torch.load(weights_only=True)).
    """
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    sources = prompt_sources(prompts)
    if isinstance(model_or_path, (str, Path)):
        config = load_config(model_or_path)
        window = _window(window, config)
        with transformers_bars(progress):
            model, loaded_tokenizer = load_model(model_or_path, config, device, allow_pickle)
        tokenizer = tokenizer or loaded_tokenizer
        model_name = str(model_or_path)
    else:
        model = model_or_path.eval()
        model_name = str(getattr(model, "name_or_path", "") or type(model).__name__)
        if tokenizer is None:
            tokenizer = _tokenizer_beside(model_name)
        window = _window(window, model.config)
    num_experts, top_k = moe_shape(model.config)
    names = expert_names(model_name, num_experts) if Path(model_name).is_dir() else None

    labelled_windows = []
    for source in sources:
        windows = token_windows(source.prompts, tokenizer, window, max_tokens)
        if not windows:
            raise UserError(f"prompts from {source.origin} produce no tokens")
        labelled_windows.append((source.label, windows))
    total = sum(len(w) for _, windows in labelled_windows for w in windows)

    with progress_bar("routing", total, progress, "tokens", transient=True) as advance:
        accumulator = collect(
            model,
            labelled_windows,
            top_k=top_k,
            num_experts=num_experts,
            batch_size=batch_size,
            method=method,
            progress=advance,
        )
    return RouteStats.from_accumulator(
        accumulator,
        model=model_name,
        architecture=",".join(getattr(model.config, "architectures", None) or [type(model).__name__]),
        layers=[layer for layer, _ in find_routers(model)],
        sources=[
            {
                "label": s.label,
                "origin": s.origin,
                "prompts": len(s.prompts),
                "windows": len(w),
                "tokens": sum(map(len, w)),
            }
            for s, (_, w) in zip(sources, labelled_windows)
        ],
        settings={
            "max_tokens_per_source": max_tokens,
            "window": window,
            "batch_size": batch_size,
            "device": str(next(model.parameters()).device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "transformers": _transformers_version(),
        },
        moekit_version=__version__,
        expert_names=names,
    )


def _window(window: int | None, config) -> int:
    """The window to cut prompts into: at most the model's positions, since RoPE past them is not what the model
    was trained on and the routing seen there would not be the model's."""
    positions = getattr(config, "max_position_embeddings", None)
    if window is None:
        return (
            min(DEFAULT_WINDOW, positions) if isinstance(positions, int) and positions > 0 else DEFAULT_WINDOW
        )
    if isinstance(positions, int) and positions > 0 and window > positions:
        raise UserError(
            f"--window {window} is past the model's {positions} positions (max_position_embeddings in "
            f"config.json); use --window {positions} or less"
        )
    return window


def _tokenizer_beside(name: str):
    if not Path(name).is_dir():
        raise UserError("pass tokenizer= when the model was not loaded from a local directory")
    return transformers_io.load_tokenizer(name)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
