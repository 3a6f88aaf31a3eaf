"""No network and no remote code: merges (including the ones that load models and tokenizers through transformers)
run in a process whose sockets refuse to connect and whose hub-offline switches are off, and try no connection;
and no code in moekit asks transformers for remote code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import write_config

import moekit

# Run in a fresh process: every socket entry point counts the attempt and refuses it, then `moekit merge` runs.
BLOCKED_RUN = """
import socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args[1:2] or args[:1])
    raise OSError("network is blocked in this test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
try:
    socket.create_connection(("huggingface.co", 443))
except OSError:
    pass
assert len(attempts) == 1, "the block is not in place"
attempts.clear()
import json
from moekit.cli import main
for args in json.loads(sys.argv[1]):
    try:
        main(args)
    except SystemExit as e:
        print("exit", e.code, "connection attempts", len(attempts), attempts[:3])
"""


def _run_blocked(*commands: list[str]) -> subprocess.CompletedProcess:
    """Run each `moekit` command line in one fresh process with the network blocked."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    }
    return subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_merges_that_load_transformers_make_no_connection(tiny_llama, tmp_path):
    """A dense merge with tokenizer_source: union (AutoTokenizer) and an MoE with hidden-state gates
    (AutoModelForCausalLM + AutoTokenizer) each succeed with zero connection attempts."""
    dense = write_config(
        tmp_path / "dense.yaml",
        {
            "merge_method": "linear",
            "models": [{"model": str(tiny_llama[k]), "parameters": {"weight": 1.0}} for k in ("ft1", "ft2")],
            "tokenizer_source": "union",
        },
    )
    moe = write_config(
        tmp_path / "moe.yaml",
        {
            "base_model": str(tiny_llama["base"]),
            "gate_mode": "hidden",
            "experts": [
                {"source_model": str(tiny_llama["ft1"]), "positive_prompts": ["def merge(models):"]},
                {
                    "source_model": str(tiny_llama["ft2"]),
                    "positive_prompts": ["Permission is hereby granted"],
                },
            ],
        },
    )
    outs = [tmp_path / "out-dense", tmp_path / "out-moe"]
    proc = _run_blocked(*(["merge", str(c), "-o", str(o), "-q"] for c, o in zip((dense, moe), outs)))
    assert proc.stdout.count("exit 0 connection attempts 0 ") == 2, (proc.stdout, proc.stderr)
    for out in outs:
        assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_no_code_asks_for_remote_code():
    """trust_remote_code is never set to anything but False anywhere in the package."""
    root = Path(moekit.__file__).parent
    offenders = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for path in sorted(root.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"trust_remote_code\s*=\s*(?!False\b)", line)
    ]
    assert offenders == []
    # The pattern does catch an opt-in (so the test can fail).
    assert re.search(r"trust_remote_code\s*=\s*(?!False\b)", "from_pretrained(p, trust_remote_code=True)")
