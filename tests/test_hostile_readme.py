"""The summary table in tests/README.md (each bad input and the exact line a user sees) is generated from the
case tables of the hostile suite, so it cannot drift from what moekit prints. To regenerate it after a message
changes:  MOEKIT_UPDATE_README=1 pytest tests/test_hostile_readme.py
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from hostile_models import INTERRUPTED, linear_config, micro_models, run_case, run_cli_in_process, write_yaml
from test_hostile_checkpoints import CHECKPOINT_CASES, LIED, poison
from test_hostile_configs import CONFIG_CASES
from test_hostile_merges import MERGE_CASES, run_with_little_disk
from test_hostile_outputs import OUTPUT_CASES, run_on_locked_output, run_while_output_appears

import moekit
import moekit.io.writer

__all__ = ["micro_models"]

README = Path(__file__).parent / "README.md"
START, END = "<!-- hostile-table:start -->", "<!-- hostile-table:end -->"


def _clean(text: str, replacements: dict[str, str]) -> str:
    for path, shown in sorted(replacements.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, shown)
    return text.replace("|", "\\|").strip()


def _row(name: str, what: str, message: str) -> str:
    return f"| `{name}` | {what} | `` {message} `` |"


def _case_rows(cases, models, root: Path, names: dict[str, str]) -> list[str]:
    rows = []
    for case in cases:
        case_dir = root / case.id
        result, _, _ = run_case(case, models, case_dir)
        assert result.code == 2 and len(result.lines) == 1, (case.id, result.stderr)
        rows.append(_row(case.id, case.what, _clean(result.lines[0], names | {str(case_dir): "."})))
    return rows


def _other_rows(models, root: Path, names: dict[str, str], monkeypatch, caplog) -> list[str]:
    rows = [_row("interrupt", "Ctrl-C (exit 130) or SIGTERM (exit 143) at any point of a merge", INTERRUPTED)]
    config = write_yaml(root / "config.yaml", linear_config(models["ft1"], models["ft2"]))
    names = names | {str(root): "."}

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(moekit.io.writer, "open", no_space, raising=False)
        full = run_cli_in_process("merge", str(config), "-o", str(root / "out"))
    rows.append(_row("disk-full", "the disk fills up during the merge", _clean(full.lines[0], names)))
    (root / "out").mkdir()
    exists = run_cli_in_process("merge", str(config), "-o", str(root / "out"))
    rows.append(
        _row("output-exists", "the output directory exists, without --force", _clean(exists.lines[0], names))
    )
    bad = shutil.copytree(models["ft2"], root / "bad")
    poison(float("nan"))(bad)
    with caplog.at_level(logging.WARNING, logger="moekit"):
        moekit.merge(linear_config(models["ft1"], bad), root / "nan-out", allow_nonfinite=True)
    warning = next(r.getMessage() for r in caplog.records if LIED in r.getMessage())
    rows.append(
        _row(
            "nan-allowed",
            "NaN in an input, with --allow-nonfinite (exit 0)",
            _clean(f"WARNING: {warning}", names),
        )
    )
    return rows


def _output_rows(models, root: Path, names: dict[str, str], monkeypatch) -> list[str]:
    rows = _case_rows(OUTPUT_CASES, models, root / "cases", names)
    for case, what, run in (
        ("output-locked", "another merge is writing the same output", run_on_locked_output),
        (
            "output-appeared",
            "the output is created by another program while the merge runs",
            lambda m, d: run_while_output_appears(m, d, monkeypatch),
        ),
        (
            "output-too-big",
            "the output needs more than the free disk space (dry run or not)",
            lambda m, d: run_with_little_disk(m, d, monkeypatch, "--dry-run"),
        ),
    ):
        case_dir = root / case
        case_dir.mkdir(parents=True)
        result = run(models, case_dir)
        assert result.code == 2 and len(result.lines) == 1, (case, result.stderr)
        rows.append(_row(case, what, _clean(result.lines[0], names | {str(case_dir): "."})))
    return rows


def _table(models, root: Path, monkeypatch, caplog) -> str:
    names = {str(p): f"models/{p.name}" for p in models.values()}
    header = ["| case | bad input | what the user sees (stderr; exit 2 unless noted) |", "|---|---|---|"]
    sections = [
        ("Broken configs", _case_rows(CONFIG_CASES, models, root / "configs", names)),
        ("Broken checkpoints", _case_rows(CHECKPOINT_CASES, models, root / "checkpoints", names)),
        (
            "Interruptions, full disks, existing outputs, allowed NaN",
            _other_rows(models, root, names, monkeypatch, caplog),
        ),
        ("Existing outputs and concurrent runs", _output_rows(models, root / "outputs", names, monkeypatch)),
        ("Wrong merges and tracebacks, refused", _case_rows(MERGE_CASES, models, root / "merges", names)),
    ]
    return "\n\n".join(f"#### {title}\n\n" + "\n".join(header + rows) for title, rows in sections)


def test_readme_table_is_what_moekit_prints(micro_models, tmp_path, monkeypatch, caplog):
    table = _table(micro_models, tmp_path, monkeypatch, caplog)
    text = README.read_text()
    before, rest = text.split(START)
    _, after = rest.split(END)
    fresh = f"{before}{START}\n{table}\n{END}{after}"
    if os.environ.get("MOEKIT_UPDATE_README") == "1":
        README.write_text(fresh)
        text = fresh
    assert text == fresh, (
        "tests/README.md is out of date: MOEKIT_UPDATE_README=1 pytest tests/test_hostile_readme.py"
    )
