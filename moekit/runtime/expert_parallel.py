"""Expert parallelism on torch.distributed: each rank holds E / world_size experts of one MoE layer.

Data flow of one call on every rank (all ranks call it together, in the same order):
  1. sort this rank's (token, slot) assignments by global expert id; experts are placed in contiguous blocks
     (rank r owns experts r·E_local .. (r+1)·E_local − 1), so the sorted rows are also grouped by owner rank;
  2. exchange the per-expert row counts (one small all_to_all of E int64s), which gives every rank the uneven
     split sizes of both directions and the local expert of each row it will receive;
  3. dispatch the rows with `all_to_all_single` (uneven splits); they arrive grouped by source rank, then by
     local expert;
  4. run the local experts with the runtime's grouped experts (`moekit.runtime.moe_forward`, any backend);
  5. send the results back with the reverse `all_to_all_single`, then scale by the routing weights and
     index-add into token order on the rank that owns the tokens.

The routing weights never travel: they are applied in step 5, on the token's own rank, so the router's gradient
stays local. The collectives are the differentiable functional collectives of torch.distributed, so backward
runs the same two exchanges in reverse. `torch.distributed.nn.functional.all_to_all_single` does the same but
is deprecated (FutureWarning) in torch 2.13 in favour of these.

Backward contract (as for any collective in autograd): every rank must build the same graph, i.e. agree on
whether the hidden states and expert weights require grad, and call backward.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from moekit.errors import UserError
from moekit.runtime.experts import moe_forward
from moekit.runtime.layer import MoELayer
from moekit.runtime.sorting import sort_by_expert


def local_experts(num_experts: int, rank: int, world_size: int) -> range:
    """The global ids of the experts that `rank` holds: one contiguous block of E / world_size."""
    if num_experts % world_size:
        raise UserError(
            f"expert parallelism: {num_experts} experts do not split evenly over {world_size} processes; "
            f"use a process count that divides {num_experts}"
        )
    per_rank = num_experts // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def exchange_counts(expert_counts: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[world, E_local]: row (source rank s, local expert j) = how many rows rank s sends to our expert j."""
    world = dist.get_world_size(group)
    received = torch.empty_like(expert_counts)
    dist.all_to_all_single(received, expert_counts.contiguous(), group=group)
    return received.view(world, -1)


def all_to_all_rows(
    rows: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """`all_to_all_single` over dim 0 with uneven splits; differentiable while grad mode is on."""
    if torch.is_grad_enabled():
        out = funcol.all_to_all_single_autograd(
            rows.contiguous(), output_splits, input_splits, group or dist.group.WORLD
        )
        return funcol.wait_tensor(out)
    out = rows.new_empty((sum(output_splits), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), output_splits, input_splits, group=group)
    return out


def expert_parallel_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    num_experts: int,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """SwiGLU experts over this rank's tokens, with the experts sharded over the ranks of `group`.

    hidden [T, H] and the routing top_k_index / top_k_weights [T, k] (global expert ids) are this rank's own;
    gate_up_proj [E_local, 2I, H] and down_proj [E_local, H, I] are this rank's block of experts (see
    `local_experts`). Returns [T, H] in hidden's dtype: the same numbers as the single-process experts over
    all E experts. T may differ between ranks and may be 0; a rank may receive no rows at all.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    per_rank = gate_up_proj.shape[0]
    if per_rank * world != num_experts:
        raise UserError(
            f"expert parallelism: rank {rank} holds {per_rank} experts but {num_experts} experts over "
            f"{world} processes need {num_experts // max(world, 1)} per rank"
        )
    rows = sort_by_expert(top_k_index, num_experts)
    order, tokens = rows.order[: rows.num_kept], rows.tokens[: rows.num_kept]
    counts_in = exchange_counts(rows.counts, group)  # [world, E_local]
    send_splits = rows.counts.view(world, per_rank).sum(dim=1).tolist()
    recv_splits = counts_in.sum(dim=1).tolist()

    received = all_to_all_rows(hidden[tokens], recv_splits, send_splits, group)
    # Received rows are grouped by (source rank, local expert): label each with its local expert.
    local_ids = torch.arange(per_rank, device=hidden.device).repeat(world)
    local_ids = local_ids.repeat_interleave(counts_in.reshape(-1).to(hidden.device))
    unit_weights = torch.ones(received.shape[0], 1, dtype=torch.float32, device=hidden.device)
    expert_out = moe_forward(
        received, local_ids[:, None], unit_weights, gate_up_proj, down_proj, backend=backend
    )
    returned = all_to_all_rows(expert_out, send_splits, recv_splits, group)

    scale = top_k_weights.reshape(-1)[order].float()
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    out = out.index_add(0, tokens, returned.float() * scale[:, None])
    return out.to(hidden.dtype)


def even_row_split(num_rows: int, world_size: int) -> list[int]:
    """Rows per rank when `num_rows` replicated rows are shared out: the first ranks take one more."""
    base, extra = divmod(num_rows, world_size)
    return [base + (r < extra) for r in range(world_size)]


class _ScatterRows(torch.autograd.Function):
    """Forward: keep this rank's share of replicated rows. Backward: all-gather the shares' gradients."""

    @staticmethod
    def forward(ctx, rows, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        splits = even_row_split(rows.shape[0], world)
        ctx.group, ctx.splits = group, splits
        start = sum(splits[:rank])
        return rows[start : start + splits[rank]]

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad, ctx.splits, ctx.group), None


class _GatherRows(torch.autograd.Function):
    """Forward: all-gather every rank's share into the replicated rows. Backward: keep this rank's share."""

    @staticmethod
    def forward(ctx, share, splits, group):
        ctx.group, ctx.splits = group, splits
        return _gather_rows(share, splits, group)

    @staticmethod
    def backward(ctx, grad):
        rank = dist.get_rank(ctx.group)
        start = sum(ctx.splits[:rank])
        return grad[start : start + ctx.splits[rank]], None, None


def _gather_rows(share: torch.Tensor, splits: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    # gloo's all_gather needs equal sizes: pad every share to the largest, then drop the padding.
    width = max(splits)
    padded = share.new_zeros((width, *share.shape[1:]))
    padded[: share.shape[0]] = share
    pieces = [torch.empty_like(padded) for _ in splits]
    dist.all_gather(pieces, padded.contiguous(), group=group)
    return torch.cat([piece[:n] for piece, n in zip(pieces, splits)])


def scatter_replicated(rows: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's share (`even_row_split`) of rows that every rank holds identically; gradients are gathered."""
    return _ScatterRows.apply(rows, group)


def gather_replicated(
    share: torch.Tensor, num_rows: int, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Inverse of `scatter_replicated`: every rank gets all `num_rows` rows; backward keeps this rank's share."""
    return _GatherRows.apply(share, even_row_split(num_rows, dist.get_world_size(group)), group)


class ExpertParallelExperts(torch.nn.Module):
    """A drop-in for transformers' experts modules (forward(hidden, top_k_index, top_k_weights)) that holds
    only this rank's block of experts and runs `expert_parallel_experts`.

    `replicated_tokens=False` (data parallel): each rank passes its own tokens.
    `replicated_tokens=True`: every rank passes the same tokens (e.g. a model whose other layers are replicated,
    as in `moekit.runtime.ep_generate`); each rank dispatches only its even share of them and the outputs are
    all-gathered, so no expert work is repeated and every rank ends with the full, identical output.
    """

    def __init__(
        self,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        num_experts: int,
        group: dist.ProcessGroup | None = None,
        replicated_tokens: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(gate_up_proj)  # [E_local, 2I, H]
        self.down_proj = torch.nn.Parameter(down_proj)  # [E_local, H, I]
        self.num_experts = num_experts
        self.group = group
        self.replicated_tokens = replicated_tokens
        self.backend = backend

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if not self.replicated_tokens:
            return self._experts(hidden, top_k_index, top_k_weights)
        share = self._experts(
            scatter_replicated(hidden, self.group),
            scatter_replicated(top_k_index, self.group),
            scatter_replicated(top_k_weights, self.group),
        )
        return gather_replicated(share, hidden.shape[0], self.group)

    def _experts(self, hidden, top_k_index, top_k_weights):
        return expert_parallel_experts(
            hidden,
            top_k_index,
            top_k_weights,
            self.gate_up_proj,
            self.down_proj,
            self.num_experts,
            self.group,
            self.backend,
        )

    def extra_repr(self) -> str:
        rank = dist.get_rank(self.group) if dist.is_initialized() else 0
        held = self.gate_up_proj.shape[0]
        return f"experts {rank * held}..{(rank + 1) * held - 1} of {self.num_experts}, replicated_tokens={self.replicated_tokens}"


class ExpertParallelMoE(MoELayer):
    """The expert-parallel `moekit.runtime.MoELayer`: the router (and any shared expert) is replicated on every
    rank and the experts module is an `ExpertParallelExperts` holding this rank's block; forward is
    `MoELayer.forward` and returns the same `MoEOutput` (output, router logits, auxiliary losses).

    Build it from a layer with `from_layer`, or as `ExpertParallelMoE(router, ExpertParallelExperts(...))` from
    this rank's weights. With data-parallel tokens the router's gradient, the auxiliary losses and the capacity
    limit are per rank (its own tokens), as in any data-parallel MoE: all-reduce the router's gradient like any
    replicated parameter (DDP does).
    """

    @classmethod
    def from_layer(
        cls, layer: MoELayer, group: dist.ProcessGroup | None = None, replicated_tokens: bool = False
    ) -> ExpertParallelMoE:
        """This rank's share of `layer` (copied), with the same router, options and backend."""
        ids = local_experts(layer.num_experts, dist.get_rank(group), dist.get_world_size(group))
        experts = ExpertParallelExperts(
            layer.experts.gate_up_proj.detach()[ids.start : ids.stop].clone(),
            layer.experts.down_proj.detach()[ids.start : ids.stop].clone(),
            layer.num_experts,
            group,
            replicated_tokens,
            layer.experts.backend,
        )
        return cls(
            copy.deepcopy(layer.router),
            experts,
            shared_expert=copy.deepcopy(layer.shared_expert),
            jitter_noise=layer.jitter_noise,
            capacity_factor=layer.capacity_factor,
        )


class Traffic(NamedTuple):
    """Rows one rank sends to other ranks in one dispatch (the combine returns as many), and their bytes."""

    remote_rows: int
    local_rows: int
    remote_bytes: int


def dispatch_traffic(
    top_k_index: torch.Tensor, num_experts: int, rank: int, world_size: int, row_bytes: int
) -> Traffic:
    """What one `expert_parallel_experts` dispatch moves for this rank: rows for other ranks travel, rows for
    our own experts stay (a real all-to-all copies them locally). The count exchange adds E·8 bytes."""
    owners = sort_by_expert(top_k_index, num_experts).counts.view(world_size, -1).sum(dim=1)
    local_rows = int(owners[rank])
    remote_rows = int(owners.sum()) - local_rows
    return Traffic(remote_rows, local_rows, remote_rows * row_bytes)
