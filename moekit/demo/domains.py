"""Two text domains found on every machine, split by document into train and held-out token windows.

- "code": Python standard-library source (the running interpreter's, else any /usr/lib/python3*).
- "legal": the licence texts under /usr/share/common-licenses (else LICENSE files shipped in installed
  packages' dist-info folders).

The split is by document group, so held-out text is never seen in training: a code group is one source file;
a legal group is one licence family (GPL-1/2/3 share most of their wording, so one of them in training would
leak the others), and identical texts are read once. Groups are shuffled with a fixed seed from sorted file lists,
held-out groups are filled first, then training groups; each split's documents are tokenised, joined by the
tokenizer's end-of-text token and cut into fixed-length windows. The windows are cached in a safetensors file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
import re
import site
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit import transformers_io
from moekit.demo.cache import atomic_file, cache_key, cache_root
from moekit.errors import UserError

LICENCE_DIR = Path("/usr/share/common-licenses")
# Generated tables (encodings), test suites and third-party packages are not "standard-library source".
_SKIPPED_CODE_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "encodings",
    "__pycache__",
}


@dataclass(frozen=True)
class Corpus:
    """The candidate documents of a domain and how they are grouped for the split."""

    name: str
    root: Path
    files: tuple[Path, ...]  # sorted, each a distinct text
    group_of: Callable[[Path], str]  # documents of one group land on the same side of the split
    max_tokens_per_file: int | None  # caps one long file's share, so a split spans many documents


@dataclass(frozen=True)
class DomainWindows:
    """Token windows of one domain: `train` and `heldout` are int64 [n, seq_len]; the files are relative paths."""

    name: str
    train: torch.Tensor
    heldout: torch.Tensor
    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]


def python_source_corpus() -> Corpus:
    """Python standard-library modules (excluding tests and generated tables), from this interpreter or /usr/lib."""
    candidates = [Path(sysconfig.get_paths()["stdlib"])]
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/python3*"), reverse=True)]
    for root in candidates:
        files = sorted(
            p
            for p in root.rglob("*.py")
            if p.is_file() and not _SKIPPED_CODE_DIRS.intersection(p.relative_to(root).parts[:-1])
        )
        if len(files) >= 50:
            return Corpus("code", root, tuple(files), lambda p: str(p), max_tokens_per_file=1024)
    raise UserError(
        f"no Python standard-library source found (looked in {', '.join(map(str, candidates))}): "
        "install a Python that ships its .py sources (e.g. apt install libpython3-stdlib)"
    )


def licence_corpus() -> Corpus:
    """Licence texts: /usr/share/common-licenses, else the LICENSE files of installed packages."""
    if LICENCE_DIR.is_dir():
        files = _distinct_texts(p for p in LICENCE_DIR.iterdir() if p.is_file())
        if files:
            return Corpus("legal", LICENCE_DIR, files, _licence_family, max_tokens_per_file=None)
    site_dirs = sorted({sysconfig.get_paths()["purelib"], *site.getsitepackages()})
    found = []
    for site_dir in site_dirs:
        for pattern in ("*.dist-info/LICEN[CS]E*", "*.dist-info/COPYING*", "*.dist-info/licenses/**/*"):
            found += [p for p in Path(site_dir).glob(pattern) if p.is_file()]
    files = _distinct_texts(found)
    if not files:
        raise UserError(
            f"no licence texts found in {LICENCE_DIR} or in dist-info folders under {', '.join(site_dirs)}: "
            "install Debian's base-files package (it provides /usr/share/common-licenses)"
        )
    return Corpus("legal", Path("/"), files, _first_line, max_tokens_per_file=None)


CORPORA: dict[str, Callable[[], Corpus]] = {"code": python_source_corpus, "legal": licence_corpus}


def _distinct_texts(paths) -> tuple[Path, ...]:
    """Sorted real paths with duplicate contents (symlinks like GPL -> GPL-3, vendored copies) removed."""
    seen, kept = set(), []
    for path in sorted({Path(p).resolve() for p in paths}):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            kept.append(path)
    return tuple(kept)


def _licence_family(path: Path) -> str:
    """'GPL-2' -> 'GPL', 'LGPL-2.1' -> 'LGPL', 'CC0-1.0' -> 'CC0', 'Artistic' -> 'Artistic'."""
    return re.sub(r"-[0-9][0-9.]*$", "", path.name)


def _first_line(path: Path) -> str:
    """A licence's title line, which names it ("MIT License", "Apache License"), lower-cased."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return next((line.strip().lower() for line in text.splitlines() if line.strip()), path.name)


def domain_windows(
    name: str,
    tokenizer_dir: str | Path,
    seq_len: int = 128,
    train_windows: int = 256,
    heldout_windows: int = 32,
    seed: int = 0,
    cache: Path | None = None,
) -> DomainWindows:
    """Train and held-out token windows of domain `name` ("code" or "legal"), tokenised by `tokenizer_dir`.

    Deterministic for given inputs and cached under a key of all of them (including the file list and the
    tokenizer). Held-out gets up to `heldout_windows` windows, train up to `train_windows`; the files on the
    two sides never overlap.
    """
    if name not in CORPORA:
        from moekit.errors import did_you_mean

        raise UserError(
            f"unknown demo domain '{name}'{did_you_mean(name, CORPORA)}: choose one of {sorted(CORPORA)}"
        )
    corpus = CORPORA[name]()
    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    key = cache_key(
        name=name,
        seq_len=seq_len,
        train_windows=train_windows,
        heldout_windows=heldout_windows,
        seed=seed,
        max_tokens_per_file=corpus.max_tokens_per_file,
        files=[(str(p), p.stat().st_size) for p in corpus.files],
        tokenizer=hashlib.sha256(tokenizer_file.read_bytes()).hexdigest() if tokenizer_file.exists() else "",
    )
    path = (cache or cache_root()) / "domains" / f"{name}-{key}.safetensors"
    if not path.exists():
        windows = build_windows(corpus, tokenizer_dir, seq_len, train_windows, heldout_windows, seed)
        atomic_file(path, lambda tmp: _save(windows, tmp))
    return _load(name, path)


def build_windows(
    corpus: Corpus,
    tokenizer_dir: str | Path,
    seq_len: int,
    train_windows: int,
    heldout_windows: int,
    seed: int,
) -> DomainWindows:
    """Split `corpus` by group (held-out first, then train) and cut each side into windows. Not cached."""
    tokenizer = transformers_io.load_tokenizer(tokenizer_dir)
    # SmolLM2 separates pretraining documents with <|endoftext|>; its EOS (<|im_end|>) ends chat turns.
    vocab = tokenizer.get_vocab()
    separator = vocab["<|endoftext|>"] if "<|endoftext|>" in vocab else tokenizer.eos_token_id
    groups: dict[str, list[Path]] = {}
    for path in corpus.files:
        groups.setdefault(corpus.group_of(path), []).append(path)
    order = sorted(groups)
    random.Random(seed).shuffle(order)

    sides = {"heldout": ([], []), "train": ([], [])}  # side -> (token stream, files)
    budgets = {"heldout": heldout_windows * seq_len, "train": train_windows * seq_len}
    for group in order:
        side = next((s for s in ("heldout", "train") if len(sides[s][0]) < budgets[s]), None)
        if side is None:
            break
        stream, files = sides[side]
        for path in groups[group]:
            text = path.read_text(encoding="utf-8", errors="replace")
            ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
            stream += ids[: corpus.max_tokens_per_file] + [separator]
            files.append(str(path.relative_to(corpus.root)))

    def windows(side: str, limit: int) -> torch.Tensor:
        stream = sides[side][0]
        count = min(limit, len(stream) // seq_len)
        return torch.tensor(stream[: count * seq_len], dtype=torch.int64).view(count, seq_len)

    train, heldout = windows("train", train_windows), windows("heldout", heldout_windows)
    if len(train) == 0 or len(heldout) == 0:
        raise UserError(
            f"domain '{corpus.name}' under {corpus.root} has too little text for {heldout_windows} held-out and "
            f"some training windows of {seq_len} tokens: lower heldout_windows or seq_len"
        )
    return DomainWindows(corpus.name, train, heldout, tuple(sides["train"][1]), tuple(sides["heldout"][1]))


def _save(windows: DomainWindows, path: Path) -> None:
    from safetensors.torch import save_file

    metadata = {
        "train_files": json.dumps(windows.train_files),
        "heldout_files": json.dumps(windows.heldout_files),
    }
    save_file({"train": windows.train, "heldout": windows.heldout}, str(path), metadata=metadata)


def _load(name: str, path: Path) -> DomainWindows:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        train, heldout = f.get_tensor("train"), f.get_tensor("heldout")
    files = {k: tuple(json.loads(metadata[k])) for k in ("train_files", "heldout_files")}
    return DomainWindows(name, train, heldout, files["train_files"], files["heldout_files"])
