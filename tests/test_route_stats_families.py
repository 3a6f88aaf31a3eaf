"""route-stats on every MoE family of the matrix: the per-layer expert counts equal the experts transformers itself
runs, read from the `top_k_index` its experts module is called with (a forward pre-hook), on fresh random tokens.

The router logits are read by hooks on the router modules (their input times their [experts, hidden] weight) for
families without `output_router_logits`. Each model is also run end to end through `moekit.route_stats(path)`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_models import MOE_MATRIX, make_family_model

import moekit
from moekit.errors import UserError
from moekit.stats.collect import collect, find_routers, load_config, load_model, moe_shape


def _reference_counts(model, ids: torch.Tensor, num_experts: int) -> dict[int, np.ndarray] | None:
    """layer -> expert counts from the indices transformers passes its experts modules; None if it passes none."""
    counts: dict[int, np.ndarray] = {}
    handles = []
    for name, module in model.named_modules():
        if not name.endswith(".experts"):
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])

        def pre(mod, args, kwargs, layer=layer):
            index = kwargs.get("top_k_index", kwargs.get("router_indices"))
            if index is None:
                index = next(
                    (a for a in args[1:] if isinstance(a, torch.Tensor) and not a.is_floating_point()), None
                )
            if index is not None:
                counts[layer] = np.bincount(index.reshape(-1).numpy(), minlength=num_experts)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return counts or None


@pytest.mark.parametrize("model_type", MOE_MATRIX)
def test_route_stats_counts_are_the_experts_the_model_runs(model_type, tmp_path):
    path = make_family_model(tmp_path / model_type, model_type, seed=3)
    config = load_config(path)
    num_experts, top_k = moe_shape(config)
    model, _ = load_model(path, config, "cpu")
    routers = find_routers(model)
    assert routers, model_type
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(11))
    biases = [
        t
        for n, t in (*model.named_parameters(), *model.named_buffers())
        if n.endswith("e_score_correction_bias")
    ]
    if any(bool((b != 0).any()) for b in biases):
        # A learned correction bias changes which experts run: refused rather than counted wrong.
        with pytest.raises(UserError, match="correction bias"):
            collect(model, [(None, [ids[0].tolist()])], top_k=top_k, num_experts=num_experts)
        with torch.no_grad():
            for b in biases:
                b.zero_()
    acc = collect(model, [(None, [ids[0].tolist()])], top_k=top_k, num_experts=num_experts)
    counts = np.asarray(acc.counts)
    assert counts.shape == (len(routers), num_experts)
    assert (counts.sum(1) == 24 * top_k).all()
    reference = _reference_counts(model, ids, num_experts)
    if reference is not None:
        layers = [layer for layer, _ in routers]
        assert sorted(reference) == layers, model_type
        for row, layer in enumerate(layers):
            np.testing.assert_array_equal(
                counts[row], reference[layer], err_msg=f"{model_type} layer {layer}"
            )
    if biases:
        return  # the saved checkpoint keeps its bias, so the end-to-end run is the refusal above
    stats = moekit.route_stats(
        path, ["def merge(models, weights): return sum(w * m for w, m in zip(weights, models))"]
    )
    assert np.asarray(stats.counts).sum() > 0
