"""Comparing two merge outputs tensor by tensor, in fp32, and formatting the benches' tables."""

from __future__ import annotations

import statistics
from pathlib import Path

from moekit.io.safetensors_reader import TensorReader, checkpoint_infos


def max_abs_diff(a: Path, b: Path) -> tuple[float, str]:
    """The largest |a - b| over every tensor of two model directories (fp32), and the tensor where it occurs.

    Tensor names and shapes must agree; a name present in only one output is an infinite difference."""
    ra, rb = TensorReader(checkpoint_infos(Path(a))), TensorReader(checkpoint_infos(Path(b)))
    try:
        names_a, names_b = set(ra.names()), set(rb.names())
        if names_a != names_b:
            only = sorted(names_a ^ names_b)
            return float("inf"), f"names differ: {only[:3]}"
        worst, where = 0.0, ""
        for name in sorted(names_a):
            x, y = ra.read(name).float(), rb.read(name).float()
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
