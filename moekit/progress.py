"""moekit's one progress bar (rich, on stderr), or nothing when quiet; and transformers' own bars following the
same switch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextmanager
def progress_bar(
    label: str, total: int, enabled: bool, unit: str, *, transient: bool = False, **fields: str
) -> Iterator[Callable[..., None]]:
    """A bar on stderr over `total` units (shown as sizes when unit is "bytes"), with elapsed time and ETA.
    Yields `advance(amount=1, **fields)`; `fields` (e.g. loss="-") are shown after the count and updated by
    advance. Nothing is drawn when disabled."""
    if not enabled or total <= 0:
        yield lambda amount=1, **values: None
        return
    count = DownloadColumn() if unit == "bytes" else TextColumn(f"{{task.completed}}/{{task.total}} {unit}")
    shown = [TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields]
    columns = (
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        count,
        *shown,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=transient) as bar:
        task = bar.add_task(label, total=total, **fields)
        yield lambda amount=1, **values: bar.update(task, advance=amount, **values)


@contextmanager
def transformers_bars(enabled: bool) -> Iterator[None]:
    """transformers' own bars (its "Loading weights" one) shown only when ours are: a quiet run stays quiet."""
    from transformers.utils import logging as hf_logging

    turn_off = hf_logging.is_progress_bar_enabled() and not enabled
    if turn_off:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if turn_off:
            hf_logging.enable_progress_bar()
