"""The files route-stats writes (--json, --csv, --plot): checked before the run, then written whole or not at all.

An output is refused when it already exists (unless `force`), exists and is not a regular file (`/dev/full`, a
directory), lies inside the model directory (symlinks resolved: a report must never replace the weights or the
config it was computed from), has no directory to go into, or, for the plot, has a suffix that is not a format we
draw. Every file goes to a temporary sibling, is fsynced, and is renamed over its target only once all of them are
on disk, so a full disk or an interrupt leaves the old files (or none), never a truncated one.

Nothing here imports torch, so these checks answer before the model is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping
from pathlib import Path

from moekit.errors import UserError


def check_model_dir(path: str | Path) -> Path:
    """The model directory route-stats reads, refused in one line when it is missing or has no config.json."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory not found: {path} (route-stats takes a local model directory)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: pass a transformers model directory")
    return path


PLOT_FORMATS = ("png", "pdf", "svg")


def resolved_outputs(
    outputs: Mapping[str, str | os.PathLike | None], model_dir: str | os.PathLike | None, force: bool
) -> dict[str, Path]:
    """Check the outputs named by option (e.g. {'--json': 'stats.json', '--csv': None}); returns option -> the
    file that will be written (symlinks followed, so writing replaces a link's target, never the link)."""
    model_root = Path(model_dir).resolve() if model_dir is not None else None
    targets: dict[str, Path] = {}
    for option, value in outputs.items():
        if value is None or value == "":
            continue
        path = Path(value)
        target = path.resolve()
        for other, seen in targets.items():
            if seen == target:
                raise UserError(f"{other} and {option} both write '{path}'; give each output its own file")
        if model_root is not None and (target == model_root or model_root in target.parents):
            raise UserError(
                f"{option} '{path}' is inside the model directory {model_dir}; route-stats never writes there "
                "(it could replace the model's own files): choose a path outside it"
            )
        if option == "--plot" and path.suffix.lower().lstrip(".") not in PLOT_FORMATS:
            raise UserError(
                f"--plot '{path}': unknown image format '{path.suffix or '(no suffix)'}'; end the name in "
                + ", ".join(f".{f}" for f in PLOT_FORMATS)
            )
        check_target(option, path, target, force)
        targets[option] = target
    return targets


def check_target(option: str, path: Path, target: Path, force: bool) -> None:
    """One output file: refused if it exists (without `force`) or is not a regular file, or if its directory is
    missing or not writable. Run again just before writing, since the run may take hours."""
    if target.exists():
        if not target.is_file():
            raise UserError(f"{option} '{path}' exists and is not a regular file; choose another path")
        if not force:
            raise UserError(f"{option} '{path}' already exists; pass --force to replace it")
    parent = target.parent
    if not parent.is_dir():
        raise UserError(f"{option} '{path}': directory '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{option} '{path}': directory '{parent}' is not writable; choose another path")


def write_files(contents: Mapping[Path, bytes]) -> None:
    """Write every file to a temporary sibling, fsync it, then rename each over its target.

    If any write fails, every temporary file is removed and nothing is replaced: one line says why.
    """
    written: list[tuple[Path, Path]] = []
    try:
        for target, data in contents.items():
            temporary = target.parent / f".{target.name}.moekit-tmp-{os.getpid()}"
            written.append((temporary, target))
            _write_synced(temporary, data, target)
        for temporary, target in written:
            os.replace(temporary, target)
    except BaseException:
        for temporary, _ in written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        raise


def write_file(path: str | os.PathLike, data: bytes) -> Path:
    """The Python API's writer: `data` to `path` by temporary file and rename (an existing file is replaced)."""
    target = Path(path).resolve()
    write_files({target: data})
    return Path(path)


def _write_synced(temporary: Path, data: bytes, target: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)  # left by a killed run that had our pid
    try:
        with open(temporary, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        reason = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else err.strerror or str(err)
        raise UserError(f"cannot write '{target}': {reason}; nothing was written") from None
