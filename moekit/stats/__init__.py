"""route-stats: where an MoE model sends its tokens.

`route_stats(model_or_path, prompts, ...)` runs the model over prompt windows, streams every MoE layer's router
logits into running sums (`accumulate.py`), and returns a `RouteStats` (`result.py`) whose metrics are the pure
functions of `metrics.py`. `report.py` draws the terminal table and the PNG. `specialisation_report` is the
label-vs-expert summary the clown-MoE demo prints.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moekit.stats.api import route_stats
    from moekit.stats.metrics import Specialisation
    from moekit.stats.result import RouteStats

# Imported on first use: they import torch, and the CLI checks route-stats' arguments (moekit.stats.outputs,
# moekit.stats.prompts, which import this package) before it pays for that.
_LAZY = {
    "route_stats": "moekit.stats.api",
    "Specialisation": "moekit.stats.metrics",
    "RouteStats": "moekit.stats.result",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def specialisation_report(stats: RouteStats) -> Specialisation:
    """The label-vs-expert report of a labelled run (top expert and share per label, mutual information).

    Raises ValueError when the run had fewer than two labels, since nothing can be compared then.
    """
    if stats.specialisation is None:
        raise ValueError("specialisation needs prompts under at least two labels")
    return stats.specialisation


__all__ = ["RouteStats", "Specialisation", "route_stats", "specialisation_report"]
