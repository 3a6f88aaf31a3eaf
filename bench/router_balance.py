"""Training with the papers' balancing methods: does the experts' load even out against no balancing?

A tiny MoE layer (H=16, E=8, k=2) learns a fixed random teacher MLP on the CPU. The tokens cluster around one
direction and the router starts out preferring experts 0 and 1, so without balancing the load stays skewed.
Each method trains the same layer from the same start for --steps Adam steps; printed: the load's coefficient of
variation (std / mean of the tokens per expert, 0 = even) over the first and the last 20 steps, and the last
steps' task loss (mean squared error).

    python bench/router_balance.py [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from moekit import MoELayer, moe_forward
from moekit.runtime import balancing

H, I, E, K, TOKENS, SEQ = 16, 16, 8, 2, 256, 16


def make_data(steps: int):
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(H, generator=gen)
    direction = 3 * direction / direction.norm()
    teacher = [torch.randn(32, H, generator=gen) / 4, torch.randn(H, 32, generator=gen) / 6]
    batches = []
    for _ in range(steps):
        x = direction + torch.randn(TOKENS, H, generator=gen)
        batches.append((x, F.linear(torch.tanh(F.linear(x, teacher[0])), teacher[1])))
    return direction, batches


def skewed_router(weight: torch.Tensor, direction: torch.Tensor) -> None:
    with torch.no_grad():
        weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        weight[:2] += direction / 3  # experts 0 and 1 win almost every token at the start


def run(method: str, direction, batches) -> tuple[float, float, float]:
    torch.manual_seed(2)
    router = (
        "sigmoid_bias_topk"
        if method in ("aux-loss-free bias", "sequence-level loss")
        else "softmax_topk_renorm"
    )
    if method == "expert choice":
        router = "expert_choice"
    layer = MoELayer.build(H, I, E, K, router=router, backend="torch")
    skewed_router(layer.router.weight, direction)
    gate = None
    if method == "noisy top-k":
        gate = balancing.NoisyTopKGate(H, E, K)
        skewed_router(gate.weight, direction)
    params = list(layer.parameters()) + (list(gate.parameters()) if gate else [])
    optimizer = torch.optim.Adam(params, lr=1e-2)
    tracker = None
    if method == "aux-loss-free bias":
        tracker = balancing.LoadTracker(layer.router.selection_bias)
        balancing.register_bias_update_hook(optimizer, [tracker], rate=0.01)
    cvs, losses = [], []
    for x, y in batches:
        if gate is not None:
            r, clean, std, noisy = gate(x)
            out = moe_forward(
                x, r.indices, r.weights, layer.experts.gate_up_proj, layer.experts.down_proj, backend="torch"
            )
            importance, load = gate.losses(r, clean, std, noisy)
            indices, aux = r.indices, 0.1 * (importance + load)
        else:
            result = layer(x)
            out, logits = result.hidden, result.router_logits
            indices = layer.router.select(logits.detach()).indices
            aux = torch.zeros(())
            if method == "switch aux loss":
                aux = 0.01 * result.load_balancing_loss
            if method == "sequence-level loss":
                aux = 0.01 * balancing.sequence_balance_loss(torch.sigmoid(logits), indices, TOKENS // SEQ)
        if tracker is not None:
            tracker.observe(indices)
        task = F.mse_loss(out, y)
        optimizer.zero_grad()
        (task + aux).backward()
        optimizer.step()
        cvs.append(balancing.load_cv(indices, E))
        losses.append(task.item())
    return statistics.mean(cvs[:20]), statistics.mean(cvs[-20:]), statistics.mean(losses[-20:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    direction, batches = make_data(args.steps)
    print(f"H={H}, E={E}, k={K}, {TOKENS} tokens a step, {args.steps} Adam steps (lr 1e-2)")
    print("| method | load CV, first 20 steps | load CV, last 20 steps | task loss, last 20 steps |")
    print("|---|---:|---:|---:|")
    methods = [
        "none",
        "switch aux loss",
        "noisy top-k",
        "aux-loss-free bias",
        "sequence-level loss",
        "expert choice",
    ]
    for method in methods:
        first, last, loss = run(method, direction, batches)
        print(f"| {method} | {first:.3f} | {last:.3f} | {loss:.4f} |")


if __name__ == "__main__":
    main()
