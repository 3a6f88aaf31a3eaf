"""Prompt sources for route-stats: files or strings in, token windows out, grouped by label.

The file rule (documented in `moekit route-stats --help`):

* A file whose text has a blank line between two non-empty lines is **plain text** (code, prose, a licence):
  the whole file is one document.
* Any other file is **one prompt per line** (empty lines ignored).

Every prompt (a line, or a whole plain-text document) is then tokenized without special tokens and cut into
consecutive windows of at most `window` tokens, each led by the tokenizer's BOS token when it has one. So long
prompts are chunked, never silently truncated, and short ones are left whole. `max_tokens` caps the tokens
taken from each prompt source (counting BOS), cutting the last window short.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import UserError

# A non-empty line, then one or more blank lines, then another non-empty line.
_PARAGRAPH_BREAK = re.compile(r"\S[^\n]*\n[ \t\r]*\n\s*\S")

# Labels are identifiers shown in tables and used as JSON keys and CSV column suffixes.
_LABEL = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class PromptSource:
    """Prompts from one place: a file path, or a description of an in-memory list; `label` is None if unlabelled."""

    label: str | None
    origin: str
    prompts: tuple[str, ...]


def read_prompts_file(path: str | Path) -> tuple[str, ...]:
    """The prompts held by a file under the rule in this module's docstring; raises UserError if there are none."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"prompts file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not text.strip():
        raise UserError(f"prompts file {path} is empty: give one prompt per line, or plain text")
    if _PARAGRAPH_BREAK.search(text):
        return (text,)
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def parse_prompts_option(value: str) -> tuple[str | None, Path]:
    """Split a CLI `--prompts` value into (label, path): `LABEL=FILE` or a bare `FILE`.

    A value is a bare path when that path exists, so file names holding '=' still work.
    """
    if "=" in value and not Path(value).exists():
        label, _, file = value.partition("=")
        if not _LABEL.match(label):
            raise UserError(
                f"--prompts {value!r}: label {label!r} must be letters, digits, '_', '-' or '.' (LABEL=FILE)"
            )
        return label, Path(file)
    return None, Path(value)


def prompt_sources(prompts: object) -> list[PromptSource]:
    """Normalise the API's `prompts` argument into sources.

    Accepted: a file path; a list of prompt strings; a list of `PromptSource`; or a mapping
    label -> (file path | list of prompt strings). Labelled input turns on the per-label statistics.
    """
    if isinstance(prompts, (str, Path)):
        return [PromptSource(None, str(prompts), read_prompts_file(prompts))]
    if isinstance(prompts, Mapping):
        sources = []
        for label, value in prompts.items():
            if not isinstance(label, str) or not _LABEL.match(label):
                raise UserError(f"prompt label {label!r} must be letters, digits, '_', '-' or '.'")
            sources.append(_labelled_source(label, value))
        return _checked(sources)
    if isinstance(prompts, Sequence) and all(isinstance(p, PromptSource) for p in prompts):
        return _checked(list(prompts))
    if isinstance(prompts, Sequence) and all(isinstance(p, str) for p in prompts):
        return _checked([PromptSource(None, "<list>", tuple(prompts))])
    raise UserError(
        "prompts must be a file path, a list of strings, or a mapping label -> file path or list of strings"
    )


def _labelled_source(label: str, value: object) -> PromptSource:
    if isinstance(value, (str, Path)):
        return PromptSource(label, str(value), read_prompts_file(value))
    if isinstance(value, Sequence) and all(isinstance(p, str) for p in value):
        return PromptSource(label, f"<list:{label}>", tuple(value))
    raise UserError(f"prompts for label {label!r} must be a file path or a list of strings")


def _checked(sources: list[PromptSource]) -> list[PromptSource]:
    if not sources:
        raise UserError("no prompts given: pass at least one prompts file or list")
    labelled = {s.label is not None for s in sources}
    if len(labelled) > 1:
        raise UserError("label every prompts source (LABEL=FILE) or none of them")
    for source in sources:
        if not any(p.strip() for p in source.prompts):
            raise UserError(f"prompts from {source.origin} are empty")
    return sources


def token_windows(prompts: Sequence[str], tokenizer, window: int, max_tokens: int | None) -> list[list[int]]:
    """Token-id windows for `prompts` under the rule in this module's docstring (BOS first, if any)."""
    if window < 2:
        raise UserError(f"--window must be at least 2 tokens, got {window}")
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = window - len(prefix)
    windows: list[list[int]] = []
    budget = max_tokens if max_tokens is not None else float("inf")
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), step):
            if budget <= len(prefix):
                return windows
            piece = (prefix + ids[start : start + step])[: int(min(window, budget))]
            windows.append(piece)
            budget -= len(piece)
    return windows
