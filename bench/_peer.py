"""The peer for the side-by-side benches: mergekit 0.1.5 in its own venv, and timed child-process runs.

The venv is made once under the bench cache ($MOEKIT_BENCH_DIR, default ./.cache/bench). It reuses the torch that
runs this script (same version, CPU build): the constraint pins torch to exactly that version string, so pip takes
it from a local wheel or fails, and never pulls a multi-GB CUDA build from the registry.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import venv
from dataclasses import dataclass
from pathlib import Path

import torch

MERGEKIT_VERSION = "0.1.5"
TIME_BIN = Path("/usr/bin/time")


def bench_dir() -> Path:
    d = Path(os.environ.get("MOEKIT_BENCH_DIR", Path.cwd() / ".cache" / "bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def mergekit_venv() -> Path:
    """The mergekit venv's bin/ directory, made on first use."""
    root = bench_dir() / f"mergekit-{MERGEKIT_VERSION}-venv"
    stamp = root / ".installed"
    if stamp.is_file():
        return root / "bin"
    print(f"making the mergekit {MERGEKIT_VERSION} venv in {root} (once)...", flush=True)
    venv.create(root, with_pip=True, clear=True)
    import transformers

    pins = root / "pins.txt"
    # Same torch (the CPU build) and transformers as moekit runs on, so both tools see identical libraries.
    pins.write_text(f"torch=={torch.__version__}\ntransformers=={transformers.__version__}\n")
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(pins)]
    subprocess.run([*pip, f"torch=={torch.__version__}", f"mergekit=={MERGEKIT_VERSION}"], check=True)
    stamp.touch()
    return root / "bin"


@dataclass
class RunResult:
    seconds: float
    peak_rss_bytes: int


def timed_run(cmd: list[str], env: dict[str, str] | None = None) -> RunResult:
    """Run `cmd` as a child process; its wall time and peak RSS (of the process tree's largest process)."""
    full_env = {**os.environ, **(env or {})}
    if TIME_BIN.is_file():
        with tempfile.NamedTemporaryFile("r", suffix=".time") as rep:
            proc = subprocess.run(
                [str(TIME_BIN), "-v", "-o", rep.name, *cmd], env=full_env, capture_output=True, text=True
            )
            report = rep.read()
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            )
        wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", report)
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
        h, m, s = (float(g) if g else 0.0 for g in wall.groups())
        return RunResult(h * 3600 + m * 60 + s, int(rss.group(1)) * 1024)
    # Fallback: a fresh Python wrapper per run, so RUSAGE_CHILDREN holds only this command's maximum.
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); rc = subprocess.call(sys.argv[1:]); dt = time.perf_counter() - t\n"
        "print(f'{dt} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=full_env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    dt, kb = proc.stderr.strip().splitlines()[-1].split()
    return RunResult(float(dt), int(kb) * 1024)


def moekit_cmd(config: Path, out: Path, seed: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "moekit",
        "merge",
        str(config),
        "-o",
        str(out),
        "--force",
        "--seed",
        str(seed),
        "-q",
    ]


def mergekit_cmd(config: Path, out: Path, seed: int) -> list[str]:
    """mergekit-yaml with its default options, except the seed (CPU: no --cuda)."""
    return [str(mergekit_venv() / "mergekit-yaml"), str(config), str(out), "--random-seed", str(seed)]


# mergekit reads HF_HUB_OFFLINE etc.; keep it off the network and quiet, like moekit.
PEER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
