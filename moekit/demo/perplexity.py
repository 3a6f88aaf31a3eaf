"""Perplexity of a causal LM on fixed-length token windows: exp of the mean next-token negative log-likelihood."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def perplexity(model_or_dir, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean NLL) over every predicted token of `windows` (int64 [n, seq_len]), computed in fp32 on CPU.

    `model_or_dir` is a loaded causal LM (used as is, in eval mode) or a checkpoint directory (loaded in fp32).
    Each window is scored on its own: token t is predicted from tokens < t of the same window, so a window of
    length L contributes L - 1 predictions. Windows are full length, so no position is padding; the last batch
    is simply smaller. Sums are accumulated in float64 so the result does not depend on `batch_size`.
    """
    model = _load(model_or_dir) if isinstance(model_or_dir, str | Path) else model_or_dir
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                logits = model(input_ids=batch).logits.float()
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                total_nll += nll.double().item()
                count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / count)


def _load(checkpoint: str | Path):

    from moekit import transformers_io

    return transformers_io.load_model(checkpoint, dtype=torch.float32)
