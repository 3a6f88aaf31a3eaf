"""Existing outputs and the runs around them: what --force may replace, two runs on one output, an output that
appears during a run, symlinked outputs, leftovers of killed runs, a clean-up that fails, few file descriptors.
"""

from __future__ import annotations

import fcntl
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_tensors
from hostile_models import (
    Case,
    CliResult,
    linear_config,
    litter,
    micro_models,
    run_case,
    run_cli_in_process,
    snapshot,
    write_model,
    write_yaml,
)

import moekit
import moekit.io.output_dir
import moekit.merging.api

__all__ = ["OUTPUT_CASES", "micro_models"]

TOL = 1e-6  # fp32 linear merge of two models against (a + b) / 2


def _config(m, tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "c.yaml", linear_config(m["ft1"], m["ft2"]))


def _project_folder(d: Path) -> None:
    (d / "config.json").write_text("{}")
    (d / "main.py").write_text("print('my sources')\n")
    (d / "notes.md").write_text("my notes\n")


def _model_with_subdir(d: Path) -> None:
    (d / "config.json").write_text("{}")
    (d / "src").mkdir()
    (d / "src" / "train.py").write_text("pass\n")


def _readme_only(d: Path) -> None:
    (d / "README.md").write_text("# a project\n")


def _symlink_to_output(d: Path) -> None:
    (d / "v1").mkdir()
    (d / "v1" / "moekit_config.yaml").write_text("merge_method: linear\n")
    (d / "current").symlink_to(d / "v1")


def _refused(make, what: str, needles: tuple[str, ...]) -> Case:
    """A --force run onto `<case dir>/out`, made by `make(<case dir>/out)`."""

    def config(m, d):
        (d / "out").mkdir()
        make(d / "out")
        return linear_config(m["ft1"], m["ft2"])

    name = make.__name__.strip("_").replace("_", "-")
    return Case(f"force-{name}", what, config, needles, args=("--force",))


OUTPUT_CASES: list[Case] = [
    _refused(
        _project_folder,
        "--force onto a project folder holding a config.json, sources and notes",
        ("output '{dir}/out' holds 'main.py'", "refusing to replace it even with --force"),
    ),
    _refused(
        _model_with_subdir,
        "--force onto a model directory that also holds a sub-directory",
        ("holds 'src'", "refusing to replace it even with --force"),
    ),
    _refused(_readme_only, "--force onto a directory holding only a README.md", ("holds 'README.md'",)),
    Case(
        "force-symlink",
        "--force onto a symbolic link to an earlier output",
        lambda m, d: (_symlink_to_output(d), linear_config(m["ft1"], m["ft2"]))[1],
        ("output '{dir}/current' is a symbolic link (to '{dir}/v1')",),
        args=("-o", "{dir}/current", "--force"),
        give_out=False,
    ),
]


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=lambda c: c.id)
def test_force_refuses_what_moekit_did_not_write(case, micro_models, tmp_path):
    """One line, exit 2, and the directory (and a link with its target) exactly as it was, nothing added."""
    case_dir = tmp_path / "case"
    result, _, needles = run_case(case, micro_models, case_dir)
    assert result.code == 2 and len(result.lines) == 1, result.stderr
    for needle in needles:
        assert needle in result.lines[0], (needle, result.lines[0])
    expected = tmp_path / "expected"
    expected.mkdir()
    write_yaml(expected / "config.yaml", case.config(micro_models, expected))
    assert snapshot(case_dir) == snapshot(expected)
    assert sorted(p.name for p in case_dir.iterdir()) == sorted(p.name for p in expected.iterdir())


def _moekit_output_with_notes(d: Path) -> None:
    (d / "moekit_config.yaml").write_text("merge_method: linear\n")
    (d / "notes.txt").write_text("added by hand\n")


def _bare_model(d: Path) -> None:
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\0" * 8)
    (d / "tokenizer.json").write_text("{}")
    (d / "generation_config.json").write_text("{}")


def _empty(d: Path) -> None:
    pass


@pytest.mark.parametrize(
    "make", [_moekit_output_with_notes, _bare_model, _empty], ids=lambda f: f.__name__.strip("_")
)
def test_force_replaces_what_moekit_wrote_or_a_bare_model(make, micro_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    make(out)
    result = run_cli_in_process("merge", str(_config(micro_models, tmp_path)), "-o", str(out), "--force")
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "moekit_config.yaml",
        "moekit_rerun.yaml",
    ]
    assert not litter(tmp_path) and not list(tmp_path.glob(".*moekit-lock"))


def _hold_lock(out: Path):
    """The lock another running merge on `out` would hold."""
    fd = os.open(out.parent / f".{out.name}.moekit-lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def run_on_locked_output(models, root: Path) -> CliResult:
    """`moekit merge --force` onto `root/out` while another run holds its lock."""
    fd = _hold_lock(root / "out")
    try:
        return run_cli_in_process("merge", str(_config(models, root)), "-o", str(root / "out"), "--force")
    finally:
        os.close(fd)


def test_a_second_run_on_a_locked_output_is_refused(micro_models, tmp_path):
    out = tmp_path / "out"
    fd = _hold_lock(out)
    try:
        result = run_cli_in_process("merge", str(_config(micro_models, tmp_path)), "-o", str(out), "--force")
        assert result.code == 2 and len(result.lines) == 1, result.stderr
        assert f"output '{out}' is being written by another moekit run (pid 4242)" in result.lines[0]
        assert not out.exists() and litter(tmp_path) == [".out.moekit-lock"]  # only the other run's lock
    finally:
        os.close(fd)
    result = run_cli_in_process("merge", str(_config(micro_models, tmp_path)), "-o", str(out))
    assert result.code == 0, result.stderr
    assert not list(tmp_path.glob(".*moekit-lock")), "the lock file stays behind"


@pytest.mark.slow
def test_two_merges_started_together_on_one_output(micro_models, tmp_path):
    """Real processes: one wins and writes a whole output, the other is refused in one line; neither deletes the
    other's work. The output is checked against the formula."""
    dims = dict(hidden=128, intermediate=512, layers=4, vocab=2048)
    a, b = write_model(tmp_path / "a", 1, **dims), write_model(tmp_path / "b", 2, **dims)
    config = write_yaml(tmp_path / "c.yaml", linear_config(a, b))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "moekit",
        "merge",
        str(config),
        "-o",
        str(out),
        "--shard-size",
        "200KB",
        "-q",
    ]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 2], [0, 0]), results
    for rc, err in results:
        if (
            rc == 2
        ):  # refused by the lock, or (if it started after the winner finished) by the finished output
            assert len(err.strip().splitlines()) == 1, err
            assert "being written by another moekit run" in err or "already exists" in err, err
    assert codes == [0, 2], "both runs wrote the same output"
    got, ta, tb = load_tensors(out), load_tensors(a), load_tensors(b)
    assert set(got) == set(ta)
    for name, t in got.items():
        torch.testing.assert_close(t, (ta[name] + tb[name]) / 2, atol=TOL, rtol=0)
    assert not litter(tmp_path) and not list(tmp_path.glob(".*moekit-lock"))


def run_while_output_appears(models, root: Path, monkeypatch) -> CliResult:
    """`moekit merge` onto `root/out`, which another program creates while the merge runs."""
    out = root / "out"
    real = moekit.merging.api.write_dense_metadata

    def meanwhile(plan, tmp):
        real(plan, tmp)
        out.mkdir()
        (out / "theirs.txt").write_text("written while moekit ran\n")

    with monkeypatch.context() as m:
        m.setattr(moekit.merging.api, "write_dense_metadata", meanwhile)
        return run_cli_in_process("merge", str(_config(models, root)), "-o", str(out))


def test_an_output_that_appears_during_the_run_is_not_replaced(micro_models, tmp_path, monkeypatch):
    """Another program creates the output while the merge runs: at the commit it is checked again, and kept."""
    out = tmp_path / "out"
    result = run_while_output_appears(micro_models, tmp_path, monkeypatch)
    assert result.code == 2 and len(result.lines) == 1, result.stderr
    assert f"output '{out}' appeared while this run was writing it" in result.lines[0], result.lines
    assert snapshot(out) == {"theirs.txt": b"written while moekit ran\n"} and not litter(tmp_path)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_directories_of_killed_runs_are_removed(micro_models, tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / f".out.moekit-tmp-{_dead_pid()}"
    dead.mkdir()
    (dead / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 64)
    alive = tmp_path / f".out.moekit-tmp-{os.getppid()}"  # a live process: perhaps a run on another mount
    alive.mkdir()
    other = tmp_path / f".other.moekit-tmp-{_dead_pid()}"  # another output's: not this run's business
    other.mkdir()
    result = run_cli_in_process("merge", str(_config(micro_models, tmp_path)), "-o", str(out))
    assert result.code == 0, result.stderr
    assert not dead.exists() and alive.is_dir() and other.is_dir()


def test_a_failed_clean_up_is_reported(micro_models, tmp_path, monkeypatch):
    """When the temporary directory cannot be removed (here: no file descriptors left), the error line says so
    and where it is, instead of hiding it."""
    real_rmtree = shutil.rmtree

    def rmtree_out_of_descriptors(path, *args, onexc=None, onerror=None, **kwargs):
        handler = onexc or onerror
        if handler is None or ".moekit-tmp-" not in str(path):
            return real_rmtree(path, *args, **kwargs)
        error = OSError(24, "Too many open files")
        handler(os.rmdir, str(path), error if onexc else (OSError, error, None))

    def disk_full(plan, tmp):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(moekit.merging.api, "write_dense_metadata", disk_full)
    monkeypatch.setattr(moekit.io.output_dir.shutil, "rmtree", rmtree_out_of_descriptors)
    out = tmp_path / "out"
    result = run_cli_in_process("merge", str(_config(micro_models, tmp_path)), "-o", str(out))
    monkeypatch.undo()
    assert result.code == 2 and len(result.lines) == 1, result.stderr
    line = result.lines[0]
    assert (
        "the disk is full" in line and "could not be removed (" in line and "Too many open files" in line
    ), line
    assert litter(tmp_path) and f"'{tmp_path}/.out.moekit-tmp-{os.getpid()}'" in line, line


def _limit_descriptors():
    resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))


def test_a_merge_of_many_shards_runs_under_ulimit_n_16(micro_models, tmp_path):
    """Inputs of 20+ shards each, merged by a process that may hold 16 files open (`ulimit -n 16`)."""
    sharded = []
    for name in ("ft1", "ft2"):
        moekit.merge(linear_config(micro_models[name]), tmp_path / name, shard_size=1000)
        assert len(list((tmp_path / name).glob("*.safetensors"))) > 16
        sharded.append(tmp_path / name)
    config = write_yaml(tmp_path / "c.yaml", linear_config(*sharded))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "moekit", "merge", str(config), "-o", str(out), "--shard-size", "1000", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_descriptors, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got, a, b = load_tensors(out), load_tensors(micro_models["ft1"]), load_tensors(micro_models["ft2"])
    for name, t in got.items():
        torch.testing.assert_close(t, (a[name] + b[name]) / 2, atol=TOL, rtol=0)
    assert not litter(tmp_path)
