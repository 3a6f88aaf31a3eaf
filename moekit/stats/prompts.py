"""Prompt sources for route-stats: files or strings in, token windows out, grouped by label.

The file rule (documented in `moekit route-stats --help`):

* A file whose text has a blank line between two non-empty lines is **plain text** (code, prose, a licence):
  the whole file is one document.
* Any other file is **one prompt per line** (empty lines ignored).

Every prompt (a line, or a whole plain-text document) is encoded as the model's tokenizer encodes a sequence,
with the special tokens it adds itself (BOS for Llama and Mistral tokenizers, none for Qwen2's), and cut into
consecutive windows of at most `window` tokens, each carrying those special tokens. A prompt that fits one
window is exactly `tokenizer(prompt)["input_ids"]`; long prompts are chunked, never silently truncated.
`max_tokens` caps the tokens taken from each prompt source (special tokens counted), cutting the last window short;
tokenizing stops there, so a huge file with a small cap costs the tokens it gives, not its size.

Both the file rule and the tokenizing are linear in the text: a prompt longer than CHUNK_CHARS is tokenized in
pieces, each cut before a space between two words and given the CONTEXT_CHARS before it as left context (its
tokens are dropped by their offsets), so the pieces' tokens are those of the whole text for tokenizers that split
at spaces (word-level, byte-level BPE, SentencePiece BPE; tested in tests/test_stats.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import UserError

# A line break, an empty or blank line, and its line break: one candidate paragraph break (see `is_plain_text`).
_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")

CHUNK_CHARS = 1 << 15  # longest text handed to the tokenizer at once
CONTEXT_CHARS = 64  # left context given to each later piece, so its first token is tokenized as in the whole

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
    if is_plain_text(text):
        return (text,)
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def is_plain_text(text: str) -> bool:
    """Whether a line holding a non-space is followed by a blank line and then by more text, in one pass.

    This is the rule the regex `\\S[^\\n]*\\n[ \\t\\r]*\\n\\s*\\S` states, which backtracks quadratically on
    long lines (a 160 KB line took a minute). Each blank line is looked at once, with the line before it.
    """
    text_end = len(text.rstrip())  # a non-space lies at or after position p exactly when p < text_end
    for blank in _BLANK_LINE.finditer(text):
        if blank.end() >= text_end:
            return False
        line_start = text.rfind("\n", 0, blank.start()) + 1
        if text[line_start : blank.start()].strip():
            return True
    return False


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


def sequence_specials(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a sequence's text: ([BOS], []) for Llama, ([], []) for Qwen2."""
    probe = "a"
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise UserError(
        f"the tokenizer changes a text's own tokens when it adds its special tokens ({bare} -> {full} for "
        f"{probe!r}); route-stats cannot cut windows for it"
    )


def text_ids(text: str, tokenizer, chunk_chars: int = CHUNK_CHARS) -> Iterator[list[int]]:
    """The token ids of `text` without special tokens, yielded piece by piece (see the module docstring)."""
    if len(text) <= chunk_chars:
        yield list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return
    with_context = getattr(tokenizer, "is_fast", False)  # offsets come only from fast tokenizers
    start = 0
    while start < len(text):
        end = _piece_end(text, start, chunk_chars)
        context = min(start, CONTEXT_CHARS) if with_context else 0
        if context == 0:
            yield list(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        else:
            encoded = tokenizer(
                text[start - context : end], add_special_tokens=False, return_offsets_mapping=True
            )
            offsets = encoded["offset_mapping"]
            yield [i for i, (first, _) in zip(encoded["input_ids"], offsets) if first >= context]
        start = end


def _piece_end(text: str, start: int, chunk_chars: int) -> int:
    """Where the piece from `start` ends: before a space between two non-spaces in its last three quarters, else
    before any whitespace there (which may change the token at the cut: some vocabularies join a line break to the
    next word), else after `chunk_chars` characters (a longer word is cut inside)."""
    hard = start + chunk_chars
    if hard >= len(text):
        return len(text)
    low = start + chunk_chars // 4
    space = text.rfind(" ", low, hard)
    while space > low and (text[space - 1].isspace() or text[space + 1].isspace()):
        space = text.rfind(" ", low, space)
    if space > low:
        return space
    return next((i for i in range(hard - 1, low, -1) if text[i].isspace()), hard)


def token_windows(prompts: Sequence[str], tokenizer, window: int, max_tokens: int | None) -> list[list[int]]:
    """Token-id windows for `prompts` under the rule in this module's docstring."""
    if window < 2:
        raise UserError(f"--window must be at least 2 tokens, got {window}")
    before, after = sequence_specials(tokenizer)
    step = window - len(before) - len(after)
    if step < 1:
        raise UserError(
            f"--window {window} leaves no room for text: the tokenizer adds {len(before) + len(after)} special "
            f"tokens to every sequence; use --window {len(before) + len(after) + 1} or more"
        )
    windows: list[list[int]] = []
    budget = max_tokens if max_tokens is not None else math.inf

    def emit(piece: list[int]) -> None:
        nonlocal budget
        windows.append((before + piece + after)[: int(min(window, budget))])
        budget -= len(windows[-1])

    for prompt in prompts:
        if budget <= len(before):
            break
        pending: list[int] = []
        for ids in text_ids(prompt, tokenizer):
            pending += ids
            while len(pending) >= step and budget > len(before):
                emit(pending[:step])
                del pending[:step]
            if budget <= len(before):  # no text token fits any more: stop tokenizing
                return windows
        if pending:
            emit(pending)
    return windows
