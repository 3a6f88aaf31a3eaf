"""Start-up time of the moekit CLI: a user error, `--help` and `--dry-run`, before and after, in one run.

    python bench/startup.py                      # before = commit 3882c5a, after = this checkout
    python bench/startup.py --before REV --repeats 15

"Before" is REV checked out in a temporary `git worktree` and imported through PYTHONPATH, with this checkout's
interpreter and packages; "after" is this checkout. The runs alternate (before, after, before, ...) so that load
on the machine falls on both alike, and the table gives the median wall and CPU time of each, the ratios, and
whether the run imported torch (`python -X importtime` in one extra run of each). On a shared machine the wall
time follows the load; the CPU time much less. Every command runs from an empty folder
holding copies of the example configs and the models `moekit example-models` makes for them.

Cases: a config file that does not exist; a YAML syntax error; an unknown key (a did-you-mean); a model
directory that does not exist; a misspelled merge method, method parameter and MoE key; two flags that disagree;
`moekit --help`; `moekit merge ties.yaml --dry-run` (which reads every header and
plans the merge, so it needs torch in both).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = {
    "missing config file": ["merge", "no_such.yaml", "-o", "out/x"],
    "YAML syntax error": ["merge", "typo.yaml", "-o", "out/x"],
    "unknown key (did you mean)": ["merge", "unknown_key.yaml", "-o", "out/x"],
    "missing model directory": ["merge", "missing_model.yaml", "-o", "out/x"],
    "unknown merge method": ["merge", "unknown_method.yaml", "-o", "out/x"],
    "misspelled parameter": ["merge", "misspelled_parameter.yaml", "-o", "out/x"],
    "misspelled MoE key": ["merge", "moe_key.yaml", "-o", "out/x"],
    "flag conflict (--seed, --random-seed)": [
        "merge",
        "ties.yaml",
        "-o",
        "out/x",
        "--seed",
        "1",
        "--random-seed",
        "2",
    ],
    "--help": ["--help"],
    "merge --dry-run": ["merge", "ties.yaml", "-o", "out/x", "--dry-run"],
}
EXPECTED_EXIT = {"--help": 0, "merge --dry-run": 0}  # the others are user errors: 2


def prepare(work: Path) -> None:
    """The example configs and their models, and broken variants of them, in `work`."""
    for config in (REPO / "merge_configs").glob("*.yaml"):
        shutil.copyfile(config, work / config.name)
    subprocess.run(
        [sys.executable, "-m", "moekit", "example-models", str(work)], check=True, capture_output=True
    )
    (work / "typo.yaml").write_text("merge_method: linear\nmodels:\n  - model: ./models/math\n   weight: 1\n")
    ties = (work / "ties.yaml").read_text()
    (work / "unknown_key.yaml").write_text(ties.replace("dtype: float32", "dtpye: float32"))
    (work / "missing_model.yaml").write_text(ties.replace("./models/code", "./models/cdoe"))
    (work / "unknown_method.yaml").write_text(ties.replace("merge_method: ties", "merge_method: tiess"))
    (work / "misspelled_parameter.yaml").write_text(ties.replace("density: 0.5", "densty: 0.5"))
    moe = (work / "moe_clown.yaml").read_text()
    (work / "moe_key.yaml").write_text(moe.replace("gate_mode:", "gate_mod:"))


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(tree: Path, args: list[str], work: Path) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, exit code) of one `python -m moekit ARGS` from `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    cpu, start = child_cpu_seconds(), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "moekit", *args], cwd=work, env=env, capture_output=True)
    return time.perf_counter() - start, child_cpu_seconds() - cpu, done.returncode


def imports_torch(tree: Path, args: list[str], work: Path) -> bool:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "moekit", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    return any(line.split("|")[-1].strip() == "torch" for line in done.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="3882c5a", help="the git revision to compare with")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moekit-startup-") as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.before],
            check=True,
            capture_output=True,
        )
        try:
            work = tmp / "work"
            work.mkdir()
            prepare(work)
            trees = {"before": before, "after": REPO}
            times: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for case, cli_args in CASES.items():
                want = EXPECTED_EXIT.get(case, 2)
                for _ in range(args.repeats):
                    for side, tree in trees.items():
                        wall, cpu, code = run_once(tree, cli_args, work)
                        if code != want:
                            raise SystemExit(
                                f"{side}: `moekit {' '.join(cli_args)}` exited {code}, expected {want}"
                            )
                        times.setdefault((case, side), []).append((wall, cpu))
            torch_used = {
                (c, s): imports_torch(t, a, work) for c, a in CASES.items() for s, t in trees.items()
            }
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=False
            )
    load = os.getloadavg()[0]
    print(
        f"moekit CLI start-up, median of {args.repeats} runs each; before = {args.before}, after = this checkout;"
    )
    print(f"seconds of wall time and of CPU time (user + system); load average {load:.1f} at the end\n")
    print(
        "| case | wall before | wall after | after / before | CPU before | CPU after | after / before | torch |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for case in CASES:
        row = f"| {case} "
        for kind in (0, 1):
            b, a = (statistics.median(t[kind] for t in times[(case, s)]) for s in ("before", "after"))
            row += f"| {b:.3f} | {a:.3f} | {a / b:.2f} "
        used = " -> ".join("yes" if torch_used[(case, s)] else "no" for s in ("before", "after"))
        print(row + f"| {used} |")


if __name__ == "__main__":
    main()
