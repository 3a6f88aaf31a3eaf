"""The merge methods end to end: configs through `moekit.merge` on the tiny Llama fixture, checked tensor by
tensor against the plain references of test_methods.py; the random stream's walk order and determinism; and the
one-line errors for bad parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_tensors
from helpers import assert_one_line_error, run_cli, write_config
from test_methods import close, l1_rescaled, ref_combine, ref_della, ref_slerp, ref_topk_mask

import moekit
from moekit.errors import UserError
from moekit.merging import engine

N_LAYERS = 4  # the tiny_llama fixture


def position(name: str) -> float:
    """Where mergekit 0.1.5 evaluates gradients for a tensor: layer i of n at i/(n-1); every non-layer tensor at 0."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) / (N_LAYERS - 1)
    return 0.0


def gradient(values: list[float], name: str) -> float:
    return float(np.interp(position(name), np.linspace(0, 1, len(values)), values))


def test_ties_through_merge_with_a_density_gradient(tiny_llama, tmp_path):
    weights, dens1 = [0.8, 0.5], [0.2, 0.9]
    cfg = {
        "merge_method": "ties",
        "base_model": str(tiny_llama["base"]),
        "models": [
            {"model": str(tiny_llama["ft1"]), "parameters": {"weight": weights[0], "density": dens1}},
            {"model": str(tiny_llama["ft2"]), "parameters": {"weight": weights[1], "density": 0.4}},
        ],
        "parameters": {"int8_mask": True},  # mergekit's memory option: accepted, no effect on the numbers
    }
    got = load_tensors(moekit.merge(cfg, tmp_path / "out"))
    base, f1, f2 = (load_tensors(tiny_llama[k]) for k in ("base", "ft1", "ft2"))
    for name, t in got.items():
        density = [gradient(dens1, name), 0.4]
        deltas = [
            (f[name] - base[name]) * ref_topk_mask(f[name] - base[name], d) for f, d in zip((f1, f2), density)
        ]
        assert close(t, ref_combine(base[name], deltas, weights, consensus=True, normalize=True, lam=1.0)), (
            name
        )


def test_dare_ties_walks_tensors_alphabetically_and_models_in_order(tiny_llama, tmp_path):
    """The mask stream is mergekit's: one generator seeded once, tensors in name order, models in config order."""
    weights, density, seed = [0.6, 0.9, 0.3], [0.5, 0.3, 0.7], 1234
    cfg = {
        "merge_method": "dare_ties",
        "base_model": str(tiny_llama["base"]),
        "models": [
            {"model": str(tiny_llama[k]), "parameters": {"weight": w, "density": d}}
            for k, w, d in zip(("ft1", "ft2", "ft3"), weights, density)
        ],
    }
    got = load_tensors(moekit.merge(cfg, tmp_path / "out", seed=seed))
    base, *fts = (load_tensors(tiny_llama[k]) for k in ("base", "ft1", "ft2", "ft3"))
    g = torch.Generator().manual_seed(seed)
    for name in sorted(got):
        deltas = []
        for f, d in zip(fts, density):
            mask = torch.bernoulli(torch.full(base[name].shape, d), generator=g)
            deltas.append(l1_rescaled(f[name] - base[name], mask))
        assert close(
            got[name], ref_combine(base[name], deltas, weights, consensus=True, normalize=False, lam=1.0)
        ), name


@pytest.mark.parametrize("draw_ahead", [0, 10**9], ids=["one-piece-ahead", "all-ahead"])
def test_della_stream_through_merge_includes_1d_tensors(tiny_llama, tmp_path, monkeypatch, draw_ahead):
    """DELLA through the engine (which draws the uniforms ahead on its draw thread, as far as its budget lets
    it): matrices and the 1-D norm weights, each ranked as one row, against the per-tensor reference drawn from
    one generator in plan order."""
    monkeypatch.setattr(engine, "DRAW_AHEAD_ELEMENTS", draw_ahead)
    weights, density, eps, seed = [0.7, 0.4], [0.45, 0.6], [0.2, 0.1], int(torch.randint(0, 2**31, ()))
    cfg = {
        "merge_method": "della",
        "base_model": str(tiny_llama["base"]),
        "models": [
            {"model": str(tiny_llama[k]), "parameters": {"weight": w, "density": d, "epsilon": e}}
            for k, w, d, e in zip(("ft1", "ft2"), weights, density, eps)
        ],
    }
    got = load_tensors(moekit.merge(cfg, tmp_path / "out", seed=seed))
    base, *fts = (load_tensors(tiny_llama[k]) for k in ("base", "ft1", "ft2"))
    assert any(t.dim() == 1 for t in got.values())
    g = torch.Generator().manual_seed(seed)
    for name in sorted(got):
        deltas = [ref_della(f[name] - base[name], d, e, g) for f, d, e in zip(fts, density, eps)]
        want = ref_combine(base[name], deltas, weights, consensus=True, normalize=True, lam=1.0)
        assert close(got[name], want, 1e-5), (seed, name)


def test_dare_output_files_are_deterministic_per_seed(tiny_llama, tmp_path):
    cfg = {
        "merge_method": "dare_linear",
        "base_model": str(tiny_llama["base"]),
        "models": [
            {"model": str(tiny_llama[k]), "parameters": {"weight": 0.5, "density": 0.4}}
            for k in ("ft1", "ft2")
        ],
    }
    outs = [moekit.merge(cfg, tmp_path / f"out{i}", seed=s) for i, s in enumerate((7, 7, 8))]
    files = [(o / "model.safetensors").read_bytes() for o in outs]
    assert files[0] == files[1]
    assert files[0] != files[2]


def test_slerp_gradients_and_filters(tiny_llama, tmp_path):
    attn, mlp = [0.0, 0.5, 0.3, 1.0], [1.0, 0.6, 0.7, 0.0]
    cfg = {
        "merge_method": "slerp",
        "base_model": str(tiny_llama["base"]),
        "models": [{"model": str(tiny_llama["ft1"])}],
        "parameters": {
            "t": [{"filter": "self_attn", "value": attn}, {"filter": "mlp", "value": mlp}, {"value": 0.35}]
        },
    }
    got = load_tensors(moekit.merge(cfg, tmp_path / "out"))
    base, f1 = load_tensors(tiny_llama["base"]), load_tensors(tiny_llama["ft1"])
    seen = set()
    for name, t in got.items():
        kind = "self_attn" if "self_attn" in name else "mlp" if "mlp" in name else None
        tv = gradient(attn, name) if kind == "self_attn" else gradient(mlp, name) if kind == "mlp" else 0.35
        seen.add(kind)
        assert close(t, ref_slerp(tv, base[name], f1[name])), name
    assert seen == {"self_attn", "mlp", None}


def test_model_stock_and_nuslerp_through_merge(tiny_llama, tmp_path):
    base, f1, f2 = (load_tensors(tiny_llama[k]) for k in ("base", "ft1", "ft2"))
    cfg = {
        "merge_method": "model_stock",
        "base_model": str(tiny_llama["base"]),
        "models": [{"model": str(tiny_llama["ft1"])}, {"model": str(tiny_llama["ft2"])}],
    }
    got = load_tensors(moekit.merge(cfg, tmp_path / "stock"))
    for name, t in got.items():
        a, b = (f[name] - base[name] for f in (f1, f2))
        cos = torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)).item()
        ratio = 2 * cos / (1 + cos)
        assert close(t, ratio * (f1[name] + f2[name]) / 2 + (1 - ratio) * base[name], 1e-5), name

    cfg = {
        "merge_method": "nuslerp",
        "models": [{"model": str(tiny_llama["ft1"]), "parameters": {"weight": 1.0}}, {"model": str(tiny_llama["ft2"]), "parameters": {"weight": 3.0}}],
    }  # fmt: skip
    got = load_tensors(moekit.merge(cfg, tmp_path / "nuslerp"))
    for name, t in got.items():
        assert close(t, ref_slerp(0.75, f1[name], f2[name], linear_above=1), 1e-5), name


@pytest.mark.parametrize(
    ("method", "params", "models", "needles", "via_cli"),
    [
        ("ties", {"density": 1.5, "weight": 1.0}, ["ft1"], ["density", "(0, 1]"], True),
        ("dare_ties", {"density": 0.0, "weight": 1.0}, ["ft1"], ["density", "(0, 1]"], False),
        ("slerp", {"t": 1.2}, ["ft1"], ["t", "[0, 1]"], False),
        ("slerp", {"t": 0.5}, ["ft1", "ft2"], ["slerp", "at most 1"], True),
        ("model_stock", {}, ["ft1"], ["model_stock", "at least 2"], True),
        ("ties", {"desnity": 0.5, "weight": 1.0}, ["ft1"], ["did you mean 'density'"], False),
    ],
)
def test_bad_parameters_are_one_line_user_errors(
    tiny_llama, tmp_path, method, params, models, needles, via_cli
):
    """Each case is a UserError naming the problem; a few go through the CLI for the exit code 2 and one line
    (each CLI run is a fresh interpreter, seconds apiece, so not all of them)."""
    cfg = {
        "merge_method": method,
        "base_model": str(tiny_llama["base"]),
        "models": [{"model": str(tiny_llama[m])} for m in models],
        "parameters": params,
    }
    out = tmp_path / "out"
    if via_cli:
        proc = run_cli("merge", str(write_config(tmp_path / "c.yaml", cfg)), "-o", str(out))
        assert_one_line_error(proc, *needles)
    else:
        with pytest.raises(UserError) as err:
            moekit.merge(cfg, out)
        assert all(n in str(err.value) for n in needles), str(err.value)
    assert not out.exists()
