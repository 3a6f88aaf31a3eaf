"""A progress bar over tensors and bytes written, with ETA (rich), or nothing when quiet; and transformers' own
bars following the same switch."""

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
def tensor_progress(
    total_tensors: int, total_bytes: int, enabled: bool, label: str = "merging"
) -> Iterator[Callable[[int], None]]:
    """Yields `advance(nbytes)`, to be called once per finished output tensor."""
    if not enabled:
        yield lambda nbytes: None
        return
    columns = (
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        TextColumn("{task.fields[done]}/{task.fields[n]} tensors"),
        DownloadColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(label, total=max(total_bytes, 1), done=0, n=total_tensors)
        done = 0

        def advance(nbytes: int) -> None:
            nonlocal done
            done += 1
            progress.update(task, advance=nbytes, done=done)

        yield advance


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
