"""Interruptions and full disks: SIGINT/SIGTERM at a random point of a real `moekit merge` process, and a disk
that fills up at a random byte, leave no output directory and no temporary litter; an existing output is never
touched without --force, and with --force it survives until the new one is complete.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile_models import (
    INTERRUPTED,
    assert_failed_cleanly,
    linear_config,
    litter,
    micro_models,
    run_cli_in_process,
    snapshot,
    write_model,
    write_yaml,
)

import moekit
import moekit.io.output_dir
import moekit.io.writer

__all__ = ["micro_models"]


@pytest.fixture(scope="module")
def slow_merge(tmp_path_factory) -> Path:
    """A config merging two ~24 MB models: with --shard-size 300KB the merge writes ~40 shards, one fsync each."""
    root = tmp_path_factory.mktemp("interrupt")
    dims = dict(hidden=256, intermediate=1024, layers=4, vocab=4096)
    a, b = write_model(root / "a", 1, **dims), write_model(root / "b", 2, **dims)
    return write_yaml(root / "merge.yaml", linear_config(a, b))


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, (
            f"merge ended (rc {proc.returncode}) before the signal: {proc.stderr.read()}"
        )
        assert time.monotonic() < deadline, "merge never reached the point to interrupt"
        time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, force",
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["int", "term", "int-force"],
)
def test_signal_mid_merge_leaves_nothing(sig, force, slow_merge, micro_models, tmp_path):
    seed = random.randrange(2**32)
    shards_before_signal = random.Random(seed).randint(0, 12)  # 0: as soon as the temporary directory exists
    out = tmp_path / "out"
    if force:  # an earlier, different output that must survive the interrupted replacement
        moekit.merge(linear_config(micro_models["ft1"], micro_models["ft2"]), out)
    before = snapshot(out) if force else None
    cmd = [
        sys.executable,
        "-m",
        "moekit",
        "merge",
        str(slow_merge),
        "-o",
        str(out),
        "--shard-size",
        "300KB",
        "-q",
    ]
    proc = subprocess.Popen(
        cmd + (["--force"] if force else []), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    tmp = tmp_path / f".out.moekit-tmp-{proc.pid}"
    _wait_for(lambda: tmp.is_dir() and len(list(tmp.glob("*.safetensors"))) >= shards_before_signal, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    expected_rc = 130 if sig == signal.SIGINT else 143
    assert proc.returncode == expected_rc, (seed, proc.returncode, stderr)
    assert stderr.strip().splitlines() == [INTERRUPTED], (seed, stderr)
    assert not tmp.exists() and not litter(tmp_path), (seed, litter(tmp_path))
    if force:
        assert snapshot(out) == before, seed
    else:
        assert not out.exists(), seed


class _FillingFile:
    """A file whose disk fills up after `budget` bytes, as a full disk does: the write that crosses it fails."""

    def __init__(self, f, budget: list[int]):
        self._f, self._budget = f, budget

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _fill_disk_after(monkeypatch, budget: int) -> None:
    remaining = [budget]
    monkeypatch.setattr(
        moekit.io.writer, "open", lambda *a, **k: _FillingFile(open(*a, **k), remaining), raising=False
    )


def _output_bytes(config: Path, tmp_path: Path) -> int:
    out = tmp_path / "probe"
    assert run_cli_in_process("merge", str(config), "-o", str(out), "--shard-size", "20KB").code == 0
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


@pytest.mark.parametrize("force", [False, True], ids=["fresh", "force"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_full_disk_at_a_random_byte_leaves_nothing(kind, force, micro_models, tmp_path, monkeypatch):
    m = micro_models
    cfg = (
        linear_config(m["ft1"], m["ft2"])
        if kind == "dense"
        else {
            "base_model": str(m["base"]),
            "gate_mode": "random",
            "experts": [{"source_model": str(m[n])} for n in ("ft1", "ft2")],
        }
    )
    config = write_yaml(tmp_path / "c.yaml", cfg)
    total = _output_bytes(config, tmp_path)
    out = tmp_path / "out"
    if force:
        assert run_cli_in_process("merge", str(config), "-o", str(out)).code == 0
    before = snapshot(out) if force else None
    seed = random.randrange(2**32)
    budget = random.Random(seed).randrange(0, total)
    _fill_disk_after(monkeypatch, budget)
    result = run_cli_in_process(
        "merge", str(config), "-o", str(out), "--shard-size", "20KB", *(["--force"] * force)
    )
    assert result.code == 2 and len(result.lines) == 1, (seed, budget, result.stderr)
    assert "the disk is full" in result.lines[0] and "nothing was written" in result.lines[0], result.lines
    assert not litter(tmp_path), (seed, litter(tmp_path))
    if force:
        assert snapshot(out) == before, (seed, budget)
    else:
        assert not out.exists(), (seed, budget)


def test_full_disk_while_writing_metadata(micro_models, tmp_path, monkeypatch):
    """The disk fills after the last shard, while config.json is written: still nothing is left."""

    def no_space(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(moekit.merging.api, "write_json", no_space)
    config = write_yaml(tmp_path / "c.yaml", linear_config(micro_models["ft1"], micro_models["ft2"]))
    result = run_cli_in_process("merge", str(config), "-o", str(tmp_path / "out"))
    assert_failed_cleanly(result, tmp_path / "out", "the disk is full")


def test_existing_output_is_never_touched_without_force(micro_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("not a model, but mine")
    config = write_yaml(tmp_path / "c.yaml", linear_config(micro_models["ft1"], micro_models["ft2"]))
    result = run_cli_in_process("merge", str(config), "-o", str(out))
    assert result.code == 2 and len(result.lines) == 1
    assert f"output '{out}' already exists; pass --force" in result.lines[0]
    assert snapshot(out) == {"precious.txt": b"not a model, but mine"} and not litter(tmp_path)
    # Not a model directory: --force does not replace it either.
    result = run_cli_in_process("merge", str(config), "-o", str(out), "--force")
    assert result.code == 2 and "refusing to replace it even with --force" in result.lines[0]
    assert snapshot(out) == {"precious.txt": b"not a model, but mine"} and not litter(tmp_path)
    # A config.json does not make it a model directory while other files are there.
    (out / "config.json").write_text("{}")
    result = run_cli_in_process("merge", str(config), "-o", str(out), "--force")
    assert result.code == 2 and "holds 'precious.txt'" in result.lines[0]
    assert (out / "precious.txt").is_file() and not litter(tmp_path)
    # A model directory with nothing else in it is replaced with --force.
    (out / "precious.txt").unlink()
    assert run_cli_in_process("merge", str(config), "-o", str(out), "--force").code == 0
    assert (out / "model.safetensors").is_file() and not litter(tmp_path)


def test_commit_defers_a_signal_until_the_output_is_whole(tmp_path, monkeypatch):
    """A SIGINT that arrives between the two renames of the commit is held until both are done, then raised:
    the old output is never lost half-way (it would be, were the interrupt raised between the renames)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    real_rename = os.rename
    renames = []

    def rename_then_interrupt(src, dst):
        real_rename(src, dst)
        renames.append(Path(dst).name)
        if len(renames) == 1:  # the old output has just been moved aside
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        with moekit.io.output_dir.atomic_output_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            monkeypatch.setattr(os, "rename", rename_then_interrupt)
    monkeypatch.undo()
    assert renames == [renames[0], "out"]  # both renames ran before the interrupt was raised
    assert snapshot(out) == {"new.txt": b"new"} and not litter(tmp_path)
