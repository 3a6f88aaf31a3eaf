"""Dense -> MoE sibling pairs, found by exactness: an upcycled MoE whose experts all equal the dense model's MLP
must give the dense model's logits (<= 1e-5, fp32, random router, 4 experts, top-2) when transformers runs both.

Every layout in moe/layouts.py is tested here for each of its sources; every pair it refuses (NOT_BUILT) is refused
in one line that says why. Clown-MoEs of two different experts and TIES merges of MoE checkpoints are checked too.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import load_tensors
from family_models import make_family_model

import moekit
from moekit.errors import UserError
from moekit.moe.layouts import LAYOUTS, NOT_BUILT

LOGIT_TOL = 1e-5
PAIRS = [(src, layout.name) for layout in LAYOUTS for src in layout.sources]
ERNIE = {"tie_word_embeddings": False, "use_bias": False}


def _logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("source, layout", PAIRS)
def test_identical_experts_give_the_dense_logits(source, layout, tmp_path):
    dense = make_family_model(tmp_path / "dense", source, seed=5, **(ERNIE if source == "ernie4_5" else {}))
    cfg = {
        "base_model": str(dense),
        "gate_mode": "random",
        "experts_per_token": 2,
        "architecture": layout,
        "upcycle": {"num_experts": 4},
        "dtype": "float32",
    }
    out = moekit.merge(cfg, tmp_path / "moe")
    import json

    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == layout
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(_logits(out, ids), _logits(dense, ids), atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("output", sorted(NOT_BUILT))
def test_not_built_pairs_refused_with_the_reason(output, tmp_path):
    reason = NOT_BUILT[output][1]
    cfg = {
        "base_model": "unused",
        "gate_mode": "random",
        "architecture": output,
        "upcycle": {"num_experts": 2},
    }
    with pytest.raises(UserError, match="is not built") as err:
        moekit.merge(cfg, tmp_path / "out", dry_run=True)
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_not_built_source_refused(tmp_path):
    olmo = make_family_model(tmp_path / "olmo", "olmo", tokenizer=False)
    cfg = {"base_model": str(olmo), "gate_mode": "random", "upcycle": {"num_experts": 2}}
    with pytest.raises(UserError, match="olmo -> olmoe is not built: OLMoE normalises q and k"):
        moekit.merge(cfg, tmp_path / "out", dry_run=True)


@pytest.mark.parametrize("moe_type", ["mixtral", "qwen3_moe"])
def test_ties_of_two_moe_checkpoints(moe_type, tmp_path):
    """TIES of two MoE fine-tunes over their base: the formula (trim to density by magnitude, elect the sign by
    summed mass, disjoint mean), against the safetensors tensors; the experts of a layer are trimmed together, as
    mergekit trims transformers 5's stacked gate_up / down tensors (every element once, so the order of the
    concatenation does not matter); the output loads and runs."""
    base = make_family_model(tmp_path / "base", moe_type, seed=1)
    fts = []
    for i in (2, 3):
        ft = tmp_path / f"ft{i}"
        from moekit.demo.tiny_models import make_finetune

        fts.append(make_finetune(base, ft, seed=i, scale=0.02))
    out = moekit.merge(
        {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(f), "parameters": {"weight": 1.0, "density": 0.5}} for f in fts],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
        tmp_path / "ties",
    )
    tb, t1, t2, tm = (load_tensors(p) for p in (base, *fts, out))
    assert set(tm) == set(tb)
    assert any(".experts." in n for n in tm)
    groups: dict[str, list[str]] = {}
    for name in sorted(tb):
        m = re.match(
            r"(model\.layers\.\d+)\..*experts\.\d+\.(w1|w3|gate_proj|up_proj|w2|down_proj)\.weight$", name
        )
        key = (
            name
            if m is None
            else f"{m.group(1)}:{'down' if m.group(2) in ('w2', 'down_proj') else 'gate_up'}"
        )
        groups.setdefault(key, []).append(name)
    for names in groups.values():
        deltas = []
        for t in (t1, t2):
            d = torch.cat([(t[n] - tb[n]).flatten() for n in names])
            k = int(0.5 * d.numel())
            keep = torch.zeros_like(d, dtype=torch.bool)
            if k > 0:
                keep[d.abs().topk(k).indices] = True
            deltas.append(torch.where(keep, d, torch.zeros_like(d)))
        stack = torch.stack(deltas)
        sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(stack) == sign) & (stack != 0)
        total = (stack * agree).sum(0)
        count = agree.sum(0).clamp(min=1)
        want = torch.cat([tb[n].flatten() for n in names]) + total / count
        got = torch.cat([tm[n].flatten() for n in names])
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=names[0])
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(_logits(out, ids)).all()
