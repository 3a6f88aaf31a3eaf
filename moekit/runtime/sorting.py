"""Assignments sorted by expert: the one sort every experts path (and expert parallelism) starts from."""

from __future__ import annotations

from typing import NamedTuple

import torch


class ExpertRows(NamedTuple):
    """The sorted-by-expert view of a routing: for expert e, rows `bounds[e]:bounds[e+1]` of `order`."""

    order: torch.Tensor  # [T*k] flat (token, slot) positions, sorted by expert id (stable)
    inverse: torch.Tensor  # [T, k] the sorted row of each (token, slot)
    tokens: torch.Tensor  # [T*k] the token of each sorted row: order // k
    counts: torch.Tensor  # [E] int64 rows per expert
    bounds: list[int]  # [E + 1] row offsets per expert; rows past bounds[E] are dropped assignments

    @property
    def num_kept(self) -> int:
        """Rows that some expert runs (the rest are dropped assignments, sorted last)."""
        return self.bounds[-1]


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int) -> ExpertRows:
    """Sort the flat (token, slot) assignments by expert once. Ids outside [0, E) (dropped) sort last."""
    flat = top_k_index.reshape(-1).long()
    keys = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = torch.argsort(keys, stable=True)
    positions = torch.arange(order.numel(), device=order.device)
    inverse = torch.empty_like(order).index_put_((order,), positions).view(-1, top_k_index.shape[-1])
    counts = torch.bincount(keys, minlength=num_experts + 1)[:num_experts]
    bounds = [0, *torch.cumsum(counts, 0).tolist()]
    return ExpertRows(order, inverse, order // top_k_index.shape[-1], counts, bounds)
