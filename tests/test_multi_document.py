"""Multi-document configs (mergekit-multi): a named merge's output is merged by a later document.

Reference: the same two merges run one after the other as separate configs; the chained run must give the same
tensors bit for bit, and the formula (linear then slerp's lerp branch is not used: a linear of a linear) holds in
fp32 to 1e-6.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import load_tensors

import moekit
from moekit.errors import UserError


def _write(path, docs):
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def test_named_merge_feeds_the_final_one(tiny_llama, tmp_path):
    m = tiny_llama
    w = torch.rand(2).add(0.2).tolist()
    docs = [
        {
            "merge_method": "linear",
            "models": [
                {"model": str(m["ft2"]), "parameters": {"weight": 1.0}},
                {"model": "blend", "parameters": {"weight": w[1]}},
            ],
        },
        {
            "name": "blend",
            "merge_method": "linear",
            "models": [
                {"model": str(m["base"]), "parameters": {"weight": w[0]}},
                {"model": str(m["ft1"]), "parameters": {"weight": 1 - w[0]}},
            ],
        },
    ]
    cfg = _write(tmp_path / "multi.yaml", docs)
    proc = subprocess.run(
        [sys.executable, "-m", "moekit", "merge", str(cfg), str(tmp_path / "out"), "-q"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    blend = tmp_path / "out-intermediate" / "blend"
    got, mid = load_tensors(tmp_path / "out"), load_tensors(blend)
    base, ft1, ft2 = (load_tensors(m[k]) for k in ("base", "ft1", "ft2"))
    for k in got:
        want_mid = w[0] * base[k].double() + (1 - w[0]) * ft1[k].double()
        assert (mid[k].double() - want_mid).abs().max() <= 1e-6, k
        want = (ft2[k].double() + w[1] * mid[k].double()) / (1 + w[1])
        assert (got[k].double() - want).abs().max() <= 1e-6, k
    # an existing final output is refused before any merge runs (no --force); without it, the named merge that
    # exists is reused (mergekit's --lazy) and the final one is merged again, to the same numbers
    again = subprocess.run(
        [sys.executable, "-m", "moekit", "merge", str(cfg), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "--force" in again.stderr and "reusing" not in again.stdout
    shutil.rmtree(tmp_path / "out")
    again = subprocess.run(
        [sys.executable, "-m", "moekit", "merge", str(cfg), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0 and "blend: reusing" in again.stdout, again.stderr
    assert all(torch.equal(t, got[k]) for k, t in load_tensors(tmp_path / "out").items())


@pytest.mark.parametrize(
    "docs, needle",
    [
        (
            [
                {"name": "a", "merge_method": "linear", "models": [{"model": "b"}]},
                {"name": "b", "merge_method": "linear", "models": [{"model": "a"}]},
            ],
            "cycle",
        ),
        (
            [
                {"name": "a", "merge_method": "linear", "models": [{"model": "x"}]},
                {"name": "a", "merge_method": "linear", "models": [{"model": "x"}]},
            ],
            "a second merge named 'a'",
        ),
        (
            [
                {"merge_method": "linear", "models": [{"model": "x"}]},
                {"merge_method": "linear", "models": [{"model": "y"}]},
            ],
            "a second unnamed",
        ),
    ],
)
def test_bad_multi_document_configs_are_refused_before_any_merge(tmp_path, docs, needle):
    cfg = _write(tmp_path / "multi.yaml", docs)
    with pytest.raises(UserError, match=needle):
        moekit.merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-intermediate").exists()
