"""Comparing two merge outputs tensor by tensor, in fp32, and formatting the benches' tables."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from moekit.io.safetensors_reader import TensorReader, checkpoint_infos

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _token_order(a: Path, b: Path):
    """Row indices that put b's vocabulary rows in a's token order, or None when the token sets differ."""
    from transformers import AutoTokenizer

    va, vb = (AutoTokenizer.from_pretrained(str(p), local_files_only=True).get_vocab() for p in (a, b))
    if set(va) != set(vb):
        return None
    order = sorted(va, key=va.get)
    return torch.tensor([vb[t] for t in order]), len(order)


def max_abs_diff(a: Path, b: Path, align_vocab: bool = False) -> tuple[float, str]:
    """The largest |a - b| over every tensor of two model directories (fp32), and the tensor where it occurs.

    Tensor names and shapes must agree; a name present in only one output is an infinite difference. With
    `align_vocab`, embedding rows are compared token by token (the two tokenizers may number tokens differently)."""
    align = _token_order(Path(a), Path(b)) if align_vocab else None
    if align_vocab and align is None:
        return float("inf"), "the two output tokenizers hold different tokens"
    ra, rb = TensorReader(checkpoint_infos(Path(a))), TensorReader(checkpoint_infos(Path(b)))
    try:
        names_a, names_b = set(ra.names()), set(rb.names())
        if names_a != names_b:
            only = sorted(names_a ^ names_b)
            return float("inf"), f"names differ: {only[:3]}"
        worst, where = 0.0, ""
        for name in sorted(names_a):
            x, y = ra.read(name).float(), rb.read(name).float()
            if align is not None and name in VOCAB_TENSORS and x.shape == y.shape:
                rows, n = align
                y = torch.cat([y[rows], y[n:]])  # padding rows past the tokens stay in place
            if x.shape != y.shape:
                return float("inf"), f"{name}: shapes {list(x.shape)} vs {list(y.shape)}"
            d = (x - y).abs().max().item() if x.numel() else 0.0
            if d > worst or d != d:
                worst, where = d, name
        return worst, where
    finally:
        ra.close()
        rb.close()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, readable in a terminal and pasteable into the README."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
