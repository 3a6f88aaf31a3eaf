"""A dry run refuses what the real run refuses, with the same line: every broken config, checkpoint and merge of
the hostile tables, each run both ways on the same files.

The only exceptions are refusals that depend on tensor values, which a dry run (headers only) cannot see; they
are listed, and the test checks that the dry run does pass them, so the list cannot go stale.
"""

from __future__ import annotations

import pytest
from hostile_models import Case, micro_models, run_cli_in_process, write_yaml
from test_hostile_checkpoints import CHECKPOINT_CASES
from test_hostile_configs import CONFIG_CASES, dense
from test_hostile_merges import MERGE_CASES

__all__ = ["micro_models"]

# Refused when the merged values are computed: NaN/Inf in an input, or results that overflow the output dtype.
NEEDS_TENSOR_DATA = {"nan-input", "inf-input", "overflow", "float16-overflow", "float8-saturates"}

PARAMETER_CASES = [
    Case(
        "della-epsilon-past-density",
        "della: density 0.9 with epsilon 0.15 (keep probabilities past 1)",
        dense("della", [("ft1", {"weight": 1, "density": 0.9, "epsilon": 0.15})], base="base"),
        ("della: della needs density ± epsilon inside (0, 1)",),
    ),
    Case(
        "multislerp-weights-cancel",
        "multislerp: weights that sum to 0 with normalize_weights",
        dense("multislerp", [("ft1", {"weight": 0.5}), ("ft2", {"weight": -0.5})]),
        ("multislerp: the weights sum to 0", "normalize_weights: false"),
    ),
]
CASES = CONFIG_CASES + CHECKPOINT_CASES + MERGE_CASES + PARAMETER_CASES


def run(case: Case, models, case_dir, *extra: str):
    config = write_yaml(case_dir / "config.yaml", case.config(models, case_dir))
    out = case_dir / "out"
    names = {k: str(v) for k, v in models.items()} | {"dir": str(case_dir), "config": str(config)}
    args = [a.format(**names) for a in case.args]
    result = run_cli_in_process(
        "merge", str(config), *(["-o", str(out)] if case.give_out else []), *args, *extra
    )
    return result, [n.format(**names) for n in case.needles]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_the_dry_run_refuses_what_the_run_refuses(case, micro_models, tmp_path):
    """Each run gets its own copy of the case's files (a case may write broken models); the lines are compared
    with the dry run's folder named as the real run's."""
    real_dir, dry_dir = tmp_path / "real", tmp_path / "dry"
    real_dir.mkdir()
    dry_dir.mkdir()
    real, needles = run(case, micro_models, real_dir)
    assert real.code == 2 and len(real.lines) == 1, real.stderr
    for needle in needles:
        assert needle in real.lines[0]
    dry, _ = run(case, micro_models, dry_dir, "--dry-run")
    if case.id in NEEDS_TENSOR_DATA:
        assert dry.code == 0, dry.stderr
    else:
        assert (dry.code, [line.replace(str(dry_dir), str(real_dir)) for line in dry.lines]) == (
            2,
            real.lines,
        )
