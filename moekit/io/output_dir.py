"""The output directory: which existing one may be replaced, the lock that keeps two runs apart, the atomic commit.

A run holds an exclusive lock on its output path (`.NAME.moekit-lock` next to it) from before planning to after
the commit, builds the output in a temporary sibling `.NAME.moekit-tmp-PID`, and renames that into place. A
second run on the same output is refused while the first holds the lock, and at the commit the output is checked
again, so nothing that appeared in the meantime is replaced without `--force`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moekit.errors import UserError
from moekit.io.output_files import MARKER_NAME, TOKENIZER_FILES
from moekit.io.safetensors_reader import INDEX_NAME, PICKLED_SUFFIXES

log = logging.getLogger("moekit")

# What a model directory holds: a directory with only these (and at least a config or weights) may be replaced.
MODEL_DIR_FILES = frozenset(
    {"config.json", "generation_config.json", "README.md", ".gitattributes", INDEX_NAME, *TOKENIZER_FILES}
    | {f"pytorch_model{s}.index.json" for s in (".bin", "")}
)
WEIGHT_SUFFIXES = (".safetensors", *PICKLED_SUFFIXES)

_held_locks: set[Path] = set()  # output paths this process holds the lock of (the lock is taken once per run)


def _sibling(out: Path, kind: str, pid: int | str) -> Path:
    return out.parent / f".{out.name}.moekit-{kind}-{pid}"


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.moekit-lock"


def check_output_free(out: Path, force: bool) -> None:
    """Refuse an existing output before any work is done, unless `force` and moekit may replace it."""
    out = Path(out)
    if out.is_symlink():
        raise UserError(
            f"output '{out}' is a symbolic link (to '{os.readlink(out)}'); moekit replaces directories, not links: "
            "pass the directory itself as --out, or remove the link"
        )
    if not out.exists():
        return
    if not force:
        raise UserError(
            f"output '{out}' already exists; pass --force to replace it (the old one is kept until the new one is complete)"
        )
    if not out.is_dir():
        raise UserError(f"output '{out}' exists and is not a directory; choose another --out")
    stranger = foreign_entry(out)
    if stranger is not None:
        raise UserError(
            f"output '{out}' holds '{stranger}', so it is not a directory moekit wrote (no {MARKER_NAME}) nor a "
            "model directory with nothing else in it; refusing to replace it even with --force: choose another --out"
        )


def foreign_entry(path: Path) -> str | None:
    """None when --force may replace directory `path`: empty, written by moekit (its marker file), or a model
    directory with nothing else in it; otherwise the name of an entry that shows it is something else."""
    if (path / MARKER_NAME).is_file():
        return None
    entries = sorted(path.iterdir())
    for e in entries:
        if (
            e.is_symlink()
            or not e.is_file()
            or not (e.name in MODEL_DIR_FILES or e.suffix in WEIGHT_SUFFIXES)
        ):
            return e.name
    if entries and not any(e.name == "config.json" or e.suffix in WEIGHT_SUFFIXES for e in entries):
        return entries[0].name  # tokenizer files or a README alone are not a model
    return None


def check_output_spares_inputs(out: Path, inputs: list[Path]) -> None:
    """Refuse an output that is, or contains, an input model: with --force, replacing it would delete the input."""
    target = Path(out).resolve()
    for model in inputs:
        source = Path(model).resolve()
        if source == target or target in source.parents:
            raise UserError(
                f"output '{out}' is or contains the input model '{model}'; writing there would replace the input: "
                "choose another --out"
            )


def check_free_space(out: Path, needed: int) -> None:
    """Refuse an output bigger than the free space where it will be written (dry runs included), before any
    byte is written. The old output of --force stays until the new one is whole, so it does not count as free."""
    where = Path(out).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed > free:
        raise UserError(
            f"output '{out}' needs {_size(needed)} but {where} has {_size(free)} free; free some space or choose an "
            "--out on a bigger disk"
        )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on output path `out` for the block; another run holding it is a one-line error.

    The lock is an flock on `.NAME.moekit-lock` next to `out` (the kernel drops it when the process dies, so a
    killed run never leaves it held). The file is removed on release; a run that opened it just before checks,
    once it has the lock, that the file it locked is still the one at that path. Directories created to hold the
    lock are removed again when the block fails. Re-entrant within a process.
    """
    out = Path(out).absolute()
    if out in _held_locks:
        yield
        return
    created = _make_parents(out.parent)
    try:
        fd = _acquire(lock_path(out), out)
    except BaseException:
        _remove_empty(created)
        raise
    _held_locks.add(out)
    try:
        yield
    except BaseException:
        _release(fd, lock_path(out), out)
        _remove_empty(created)
        raise
    _release(fd, lock_path(out), out)


def _make_parents(parent: Path) -> list[Path]:
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output directory '{parent}': {e.strerror or e}") from None
    return missing  # deepest first


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def _acquire(path: Path, out: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"cannot lock the output '{out}': {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(f"cannot lock the output '{out}': {e.strerror or e}") from None
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise UserError(
                f"output '{out}' is being written by another moekit run{who}; wait for it to finish or choose "
                "another --out"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)  # the holder released and removed it between our open and our lock: take the new one


def _release(fd: int, path: Path, out: Path) -> None:
    _held_locks.discard(out)
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def remove_stale_siblings(out: Path) -> None:
    """Remove temporary directories of earlier runs on `out` whose process is gone (killed with SIGKILL, or the
    machine went down). Called with the output lock held, so no live moekit run is writing them."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.moekit-(tmp|old)-(\d+)")
    for p in out.parent.glob(f".{glob_escape(out.name)}.moekit-*-*"):
        m = pattern.fullmatch(p.name)
        if m is None or _process_alive(int(m.group(2))) or p.is_symlink():
            continue
        if m.group(1) == "old" and not out.exists():
            continue  # killed between the two renames of a commit: this is the only copy of the old output
        failure = remove_tree(p)
        if failure:
            log.warning("could not remove %s, left by a run that was killed: %s", p, failure)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a run of ours would hold the lock; this is a leftover of a process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_tree(path: Path) -> str | None:
    """Remove directory `path`; None on success, else why the first entry could not be removed."""
    errors: list[str] = []

    def record(function, name, exc):
        exc = exc[1] if isinstance(exc, tuple) else exc  # onerror (Python < 3.12) passes sys.exc_info()
        errors.append(f"{name}: {getattr(exc, 'strerror', None) or exc}")

    shutil.rmtree(path, **({"onexc": record} if sys.version_info >= (3, 12) else {"onerror": record}))
    return errors[0] if errors and os.path.lexists(path) else None


@contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success it replaces `out` by rename, on any failure it is removed.

    With `force`, an existing `out` survives until the new directory is complete. The output path is locked for
    the block (unless the caller already holds the lock), and checked again just before the rename.
    """
    out = Path(out).absolute()
    check_output_free(out, force)
    with output_lock(out):
        remove_stale_siblings(out)
        tmp = _sibling(out, "tmp", os.getpid())
        try:
            try:
                if os.path.lexists(tmp):
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as e:
                raise UserError(f"cannot create the output next to '{out}': {e.strerror or e}") from None
            yield tmp
            if not force and os.path.lexists(out):
                raise UserError(
                    f"output '{out}' appeared while this run was writing it (another program made it); it was left "
                    "as it is and nothing was written: remove it, or pass --force"
                )
            check_output_free(out, force)  # again: what appeared there meanwhile must be replaceable too
            _commit(tmp, out)
        except BaseException as e:
            with _signals_deferred():  # a second Ctrl-C must not stop the clean-up half way
                failure = remove_tree(tmp) if os.path.lexists(tmp) else None
            if failure is None:
                raise
            if isinstance(e, UserError):
                raise UserError(
                    f"{e}; and the temporary directory '{tmp}' could not be removed ({failure})"
                ) from None
            log.error("could not remove the temporary directory %s (%s): remove it by hand", tmp, failure)
            raise


def _commit(tmp: Path, out: Path) -> None:
    with _signals_deferred():  # an interrupt between the two renames would lose the old output
        old = None
        try:
            if os.path.lexists(out):
                old = _sibling(out, "old", os.getpid())
                os.rename(out, old)
            os.rename(tmp, out)
        except OSError as e:
            if old is not None and not os.path.lexists(out):
                os.rename(old, out)
            raise UserError(f"cannot move the finished output into '{out}': {e.strerror or e}") from None
        if old is not None:
            failure = remove_tree(old)
            if failure:
                log.warning(
                    "the new output is in place, but the old one could not be removed from %s: %s",
                    old,
                    failure,
                )


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done; they are raised again (with their own handlers) after it.

    Python runs signal handlers in the main thread only, so recording them there is enough (masking the signal
    would not be: the kernel may hand it to a torch worker thread, whose C handler still wakes the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def resolve_out(out: str | Path | None, config_out: str | None, base_dir: Path | None) -> Path:
    """The output directory: `-o`, else the config's `out:` (relative to the config's folder)."""
    if out is not None:
        return Path(out)
    if config_out:
        p = Path(config_out).expanduser()
        return p if p.is_absolute() or base_dir is None else base_dir / p
    raise UserError("no output directory: pass -o/--out DIR or set 'out:' in the config")
