"""Parity with mergekit 0.1.5 on configs drawn at random: every method, fresh weights, densities and gradients.

    python bench/parity_mergekit.py                 # draw with seed 0
    python bench/parity_mergekit.py --seed 7        # other configs
    python bench/parity_mergekit.py --methods ties,slerp

Small fp32 Llama models (a base and three fine-tunes) are made locally; for each method a config is drawn from the
seed (per-model weights, densities, gammas, epsilons, some as gradient lists; slerp's t as filtered gradients; the
method's switches), both tools merge it, and the outputs are compared tensor by tensor: PASS when the max abs
difference is <= 1e-5. Randomised methods (DARE, DELLA) run with the same --random-seed in both: "bit-equal" when
the outputs are identical; otherwise a second, single-model config checks that the statistics agree: the fraction
of delta elements kept and the L1 norm of the kept delta relative to the original (the rescale).
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _compare import max_abs_diff, table  # noqa: E402
from _models import TINY, make_family, make_vocab_family  # noqa: E402
from _peer import PEER_ENV, bench_dir, mergekit_cmd, mergekit_venv, moekit_cmd  # noqa: E402

from moekit.io.safetensors_reader import TensorReader, checkpoint_infos  # noqa: E402

TOL = 1e-5
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")


def _u(r: random.Random, lo: float, hi: float) -> float:
    return round(r.uniform(lo, hi), 4)


def _maybe_gradient(r: random.Random, lo: float, hi: float):
    """A scalar, or a gradient list of 2-4 values (mergekit interpolates it over the layers; moekit refuses a
    list longer than the layer count, as some values would never be used)."""
    if r.random() < 0.5:
        return _u(r, lo, hi)
    return [_u(r, lo, hi) for _ in range(r.randint(2, 4))]


def draw_config(method: str, r: random.Random, m: list[Path]) -> dict:
    """A random config for `method` over models m = [base, ft1, ft2, ft3]."""
    base, fts = str(m[0]), [str(p) for p in m[1:]]

    def per_model(models, **ranges):
        return [
            {"model": x, "parameters": {k: _maybe_gradient(r, *rg) for k, rg in ranges.items()}}
            for x in models
        ]

    sparsity = {"weight": (0.1, 1.2), "density": (0.2, 0.9)}
    gta = {"merge_method": method, "base_model": base, "dtype": "float32"}
    if method == "linear":
        return {"merge_method": method, "models": per_model([base, *fts], weight=(0.1, 1.5)),
                "parameters": {"normalize": r.random() < 0.7}, "dtype": "float32"}  # fmt: skip
    if method == "task_arithmetic":
        return gta | {"models": per_model(fts, weight=(0.1, 1.2)), "parameters": {"lambda": _u(r, 0.5, 1.5)}}
    if method in ("ties", "dare_ties", "dare_linear"):
        params = {"lambda": _u(r, 0.5, 1.5), "normalize": r.random() < 0.5}
        return gta | {"models": per_model(fts, **sparsity), "parameters": params}
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        ranges = {"weight": (0.1, 1.2), "density": (0.5, 0.95), "gamma": (0.005, 0.05)}
        return gta | {"models": per_model(fts, **ranges), "parameters": {"lambda": _u(r, 0.5, 1.5)}}
    if method in ("della", "della_linear"):
        ranges = sparsity | {"epsilon": (0.01, 0.1)}
        return gta | {"models": per_model(fts, **ranges), "parameters": {"lambda": _u(r, 0.5, 1.5)}}
    if method == "sce":
        return gta | {"models": [{"model": x} for x in fts], "parameters": {"select_topk": _u(r, 0.2, 0.9)}}
    if method == "model_stock":
        return gta | {"models": [{"model": x} for x in fts], "parameters": {"filter_wise": r.random() < 0.5}}
    if method == "slerp":
        grad = lambda: [_u(r, 0.0, 1.0) for _ in range(r.randint(2, TINY.layers))]  # noqa: E731
        t = [
            {"filter": "self_attn", "value": grad()},
            {"filter": "mlp", "value": grad()},
            {"value": _u(r, 0, 1)},
        ]
        return {"merge_method": method, "base_model": base, "models": [{"model": base}, {"model": fts[0]}],
                "parameters": {"t": t}, "dtype": "float32"}  # fmt: skip
    if method == "nuslerp":
        cfg = {"merge_method": method, "models": per_model(fts[:2], weight=(0.1, 1.2)), "dtype": "float32",
               "parameters": {"nuslerp_flatten": r.random() < 0.5, "nuslerp_row_wise": r.random() < 0.5}}  # fmt: skip
        if r.random() < 0.5:
            cfg["base_model"] = base
        return cfg
    if method == "multislerp":
        cfg = {"merge_method": method, "models": per_model(fts, weight=(0.1, 1.2)), "dtype": "float32"}
        if r.random() < 0.5:
            cfg["base_model"] = base
        return cfg
    if method == "karcher":
        return {"merge_method": method, "models": [{"model": x} for x in fts], "dtype": "float32",
                "parameters": {"max_iter": r.randint(3, 20), "tol": 1e-6}}  # fmt: skip
    if method == "nearswap":
        return {"merge_method": method, "base_model": base, "models": [{"model": base}, {"model": fts[0]}],
                "parameters": {"t": _u(r, 0.002, 0.02)}, "dtype": "float32"}  # fmt: skip
    if method == "arcee_fusion":
        return {
            "merge_method": method,
            "base_model": base,
            "models": [{"model": base}, {"model": fts[0]}],
            "dtype": "float32",
        }
    raise KeyError(method)


VOCAB_CASES = ("linear+union", "task_arithmetic+base", "ties+union", "linear+path")


def draw_vocab_config(case: str, r: random.Random, m: list[Path]) -> dict:
    """A merge of models whose tokenizers differ (see _models.make_vocab_family), with `tokenizer_source`."""
    method, source = case.split("+")
    base, a, b = (str(p) for p in m)
    if method == "linear":
        models = [{"model": x, "parameters": {"weight": _u(r, 0.1, 1.5)}} for x in (base, a, b)]
        cfg = {"merge_method": method, "models": models, "dtype": "float32"}
        if r.random() < 0.5:
            cfg["base_model"] = base
    else:
        ranges = {"weight": (0.1, 1.2)} | ({"density": (0.3, 0.9)} if method == "ties" else {})
        models = [{"model": x, "parameters": {k: _u(r, *v) for k, v in ranges.items()}} for x in (a, b)]
        cfg = {"merge_method": method, "base_model": base, "models": models, "dtype": "float32"}
    if source == "path":
        cfg["tokenizer_source"] = b
    elif r.random() < 0.5:
        cfg["tokenizer"] = {"source": source, "pad_to_multiple_of": 16}
    else:
        cfg["tokenizer_source"] = source
    return cfg


def stats_config(method: str, r: random.Random, m: list[Path]) -> dict:
    """One fine-tune, weight 1, lambda 1: the output minus the base is exactly the sparsified, rescaled delta."""
    params = {"weight": 1.0, "density": _u(r, 0.2, 0.9)} | (
        {"epsilon": _u(r, 0.01, 0.1)} if "della" in method else {}
    )
    return {
        "merge_method": method,
        "base_model": str(m[0]),
        "models": [{"model": str(m[1]), "parameters": params}],
        "dtype": "float32",
    }


def delta_stats(out: Path, base: Path, ft: Path) -> tuple[float, float]:
    """(fraction of delta elements kept, L1 of the kept delta / L1 of the original delta), over all layer tensors."""
    ro, rb, rf = (TensorReader(checkpoint_infos(p)) for p in (out, base, ft))
    kept = total = l1_kept = l1_orig = 0.0
    for name in ro.names():
        if not name.startswith("model.layers.") or "norm" in name:
            continue
        b = rb.read(name).double()
        d_out, d = ro.read(name).double() - b, rf.read(name).double() - b
        kept += (d_out != 0).sum().item()
        total += d.numel()
        l1_kept += d_out.abs().sum().item()
        l1_orig += d.abs().sum().item()
    for x in (ro, rb, rf):
        x.close()
    return kept / total, l1_kept / l1_orig


def run(cmd: list[str]) -> str | None:
    """None on success, else the error's last line."""
    p = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, **PEER_ENV})
    if p.returncode == 0:
        return None
    lines = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
    return lines[-1][:140] if lines else f"exit {p.returncode}"


def both(cfg: dict, work: Path, tag: str, seed: int) -> tuple[Path, Path, str | None]:
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    me, mk = work / f"{tag}-moekit", work / f"{tag}-mergekit"
    for d in (me, mk):
        shutil.rmtree(d, ignore_errors=True)
    err = run(moekit_cmd(path, me, seed))
    if err:
        return me, mk, f"moekit: {err}"
    err = run(mergekit_cmd(path, mk, seed))
    return me, mk, f"mergekit: {err}" if err else None


def main() -> None:
    from moekit.merging.registry import METHODS, get_method

    get_method("linear")  # registers every method
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="draws the configs and is the merge's --random-seed")
    ap.add_argument(
        "--methods", default=None, help="comma-separated; default: every method in moekit's registry"
    )
    ap.add_argument("--no-vocab", action="store_true", help="skip the tokenizer_source cases")
    args = ap.parse_args()

    methods = args.methods.split(",") if args.methods else sorted(set(METHODS) - {"passthrough"})
    root = bench_dir()
    models = make_family(root / "models", TINY, dtype=torch.float32, n_finetunes=3)
    vocab_models = make_vocab_family(root / "models", models)
    mergekit_venv()
    work = root / f"parity-seed{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    rows, failed = [], 0
    for method in methods:
        try:
            cfg = draw_config(method, rng, models)
        except KeyError:
            rows.append([method, "-", "no config drawer for this method", "SKIP"])
            continue
        me, mk, err = both(cfg, work, method, args.seed)
        if err:
            rows.append([method, "-", err, "FAIL"])
            failed += 1
            continue
        diff, where = max_abs_diff(me, mk)
        if method in RANDOM_METHODS:
            if diff == 0:
                rows.append([method, "0 (bit-equal)", "same seed, same stream", "PASS"])
                continue
            s_me, s_mk, err = both(stats_config(method, rng, models), work, f"{method}-stats", args.seed)
            if err:
                rows.append([method, f"{diff:.2e}", err, "FAIL"])
                failed += 1
                continue
            (k1, l1), (k2, l2) = (
                delta_stats(s_me, models[0], models[1]),
                delta_stats(s_mk, models[0], models[1]),
            )
            ok = abs(k1 - k2) <= 0.005 and abs(l1 - l2) <= 0.01
            note = f"not bit-equal; kept {k1:.4f} vs {k2:.4f}, L1 ratio {l1:.4f} vs {l2:.4f}"
            rows.append([method, f"{diff:.2e}", note, "PASS (stats)" if ok else "FAIL"])
            failed += not ok
            continue
        ok = diff <= TOL
        rows.append([method, f"{diff:.2e}", "" if ok else f"worst at {where}", "PASS" if ok else "FAIL"])
        failed += not ok
    for case in () if args.no_vocab else VOCAB_CASES:
        me, mk, err = both(draw_vocab_config(case, rng, vocab_models), work, case, args.seed)
        diff, where = max_abs_diff(me, mk, align_vocab=True) if not err else (float("nan"), err)
        ok = diff <= TOL
        note = "rows compared token by token" if ok else f"worst at {where}"
        rows.append([f"tokenizer: {case}", f"{diff:.2e}", note, "PASS" if ok else "FAIL"])
        failed += not ok
    print(
        f"\nparity with mergekit 0.1.5, configs drawn with seed {args.seed} (saved in {work}), tolerance {TOL:g}\n"
    )
    print(table(["method", "max abs diff", "note", "result"], rows))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
