"""The README's table of model families x (merge, MoE source, MoE output, route-stats), from what the tests prove.

    python bench/families_table.py            # runs the family tests, then rewrites the table in README.md
    python bench/families_table.py --check    # runs them and fails if README.md's table differs

It runs tests/test_families.py (dense merges), tests/test_moe_pairs.py (exact dense -> MoE pairs, TIES of MoE
checkpoints, refused pairs) and tests/test_route_stats_families.py (route-stats counts) under pytest, reads which
parametrised cases passed from a JUnit report, and writes one row per family: a cell says "yes" only for a case
that passed in this run. A refused pair's cell gives the reason moekit prints.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from family_models import DENSE_MATRIX, MOE_MATRIX  # noqa: E402

from moekit.moe.layouts import LAYOUTS, NOT_BUILT  # noqa: E402

TESTS = ("tests/test_families.py", "tests/test_moe_pairs.py", "tests/test_route_stats_families.py")
START, END = "<!-- families-table:start -->", "<!-- families-table:end -->"
CASE = re.compile(r"^(?P<test>\w+)\[(?P<param>.+)\]$")


def passed_cases(junit: Path) -> dict[str, set[str]]:
    """test function -> the parametrisation ids that passed."""
    passed: dict[str, set[str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        if any(child.tag in ("failure", "error", "skipped") for child in case):
            continue
        m = CASE.match(case.get("name", ""))
        if m:
            passed.setdefault(m.group("test"), set()).add(m.group("param"))
    return passed


def run_tests(workers: int) -> dict[str, set[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *TESTS]
        if workers > 1:
            cmd += ["-n", str(workers)]
        proc = subprocess.run(cmd, cwd=ROOT)
        if not junit.is_file():
            sys.exit(f"pytest wrote no report (exit {proc.returncode})")
        return passed_cases(junit)


def table(passed: dict[str, set[str]]) -> str:
    dense = passed.get("test_dense_merges", set())
    pairs = passed.get("test_identical_experts_give_the_dense_logits", set())
    ties = passed.get("test_ties_of_two_moe_checkpoints", set())
    stats = passed.get("test_route_stats_counts_are_the_experts_the_model_runs", set())
    refused = passed.get("test_not_built_pairs_refused_with_the_reason", set())
    sources = {src for layout in LAYOUTS for src in layout.sources}
    refused_sources = [s for srcs, _ in NOT_BUILT.values() for s in srcs]
    families = list(dict.fromkeys([*DENSE_MATRIX, *sorted(sources), *refused_sources, *MOE_MATRIX]))
    rows = [
        "| family | merge | MoE source (-> output) | MoE output (<- sources) | route-stats |",
        "|---|---|---|---|---|",
    ]
    for fam in families:
        merge = "yes" if fam in dense else "yes (TIES of two)" if fam in ties else ""
        outs = [lay.name for lay in LAYOUTS if fam in lay.sources and f"{fam}-{lay.name}" in pairs]
        refused_out = next((o for o, (srcs, _) in NOT_BUILT.items() if fam in srcs and o in refused), None)
        source = (
            "yes -> " + ", ".join(outs)
            if outs
            else f"refused: {NOT_BUILT[refused_out][1]}"
            if refused_out
            else ""
        )
        layout = next((lay for lay in LAYOUTS if lay.name == fam), None)
        ins = [s for s in layout.sources if f"{s}-{fam}" in pairs] if layout else []
        output = "yes <- " + ", ".join(ins) if ins else "refused (see source)" if fam in NOT_BUILT else ""
        stat = "yes" if fam in stats else ""
        rows.append(f"| {fam} | {merge} | {source} | {output} | {stat} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if README.md's table differs")
    ap.add_argument("-n", "--workers", type=int, default=2)
    args = ap.parse_args()
    text = table(run_tests(args.workers))
    readme = ROOT / "README.md"
    body = readme.read_text()
    if START not in body or END not in body:
        sys.exit(f"README.md has no {START} ... {END} block")
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{text}\n{END}{tail}"
    if args.check:
        sys.exit(
            0 if new == body else "README.md's families table is out of date: python bench/families_table.py"
        )
    readme.write_text(new)
    print(text)


if __name__ == "__main__":
    main()
