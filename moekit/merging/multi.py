"""Multi-document configs (mergekit-multi's format): named merges whose outputs later documents merge.

Each YAML document is one merge config with an optional `name`. A model reference that equals a document's name
(in models, base_model, slices' sources and base_model, tokenizer_source / tokenizer.source and the tokens'
sources; `NAME+adapter` too) means that merge's output, written to the intermediate directory as `DIR/NAME`. The
unnamed document (at most one) is the final merge and goes to OUT. Merges run in dependency order; a duplicate
name, a second unnamed document or a cycle is refused before anything runs. A named output that already exists
is reused, as mergekit's --lazy does, unless --force.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import UserError
from moekit.io.output_dir import check_output_free

# Keys whose string values are model references (mergekit's ModelReference fields).
REFERENCE_KEYS = ("model", "base_model", "tokenizer_source", "source")


@dataclass
class Document:
    name: str | None
    raw: dict
    where: str  # "CONFIG: document N"


def split_documents(docs: list[dict], config: str) -> list[Document]:
    out: list[Document] = []
    for i, raw in enumerate(docs):
        where = f"{config}: document {i + 1}"
        if not isinstance(raw, dict):
            raise UserError(f"{where}: each document must be a merge config (a YAML mapping)")
        raw = dict(raw)
        name = raw.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name.strip() or "/" in name):
            raise UserError(f"{where}: name must be a plain folder name (no '/'), got {name!r}")
        if any(d.name == name for d in out):
            what = f"a second merge named '{name}'" if name else "a second unnamed (final) merge"
            raise UserError(f"{where}: {what}; names must be unique and only one merge may be unnamed")
        out.append(Document(name, raw, where))
    return out


def _named(ref: str, names: set[str]) -> str | None:
    base = ref.split("+", 1)[0]
    return base if base in names else None


def _walk(value, names: set[str], found: set[str], to_dir: Path | None):
    """`value` with references to `names` replaced by their output folders (when `to_dir`), collecting them."""
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            if key in REFERENCE_KEYS and isinstance(v, str) and (hit := _named(v, names)):
                found.add(hit)
                v = str(to_dir / hit) + v[len(hit) :] if to_dir is not None else v
            elif key == "models" and isinstance(v, list):
                v = [
                    _walk({"model": m}, names, found, to_dir)["model"] if isinstance(m, str) else m for m in v
                ]
                v = [_walk(m, names, found, to_dir) if isinstance(m, dict) else m for m in v]
            else:
                v = _walk(v, names, found, to_dir)
            out[key] = v
        return out
    if isinstance(value, list):
        return [_walk(v, names, found, to_dir) for v in value]
    return value


def run_order(documents: list[Document]) -> list[tuple[Document, set[str]]]:
    """Each document with the names it merges, dependencies first (config order otherwise)."""
    names = {d.name for d in documents if d.name}
    deps = {}
    for d in documents:
        found: set[str] = set()
        _walk(d.raw, names, found, None)
        if d.name in found:
            raise UserError(f"{d.where}: merge '{d.name}' uses its own output")
        deps[d.name] = found
    order: list[Document] = []
    state: dict[str | None, str] = {}

    def visit(d: Document, path: list[str]) -> None:
        if state.get(d.name) == "done":
            return
        if state.get(d.name) == "visiting":
            raise UserError(
                f"{d.where}: merges depend on each other in a cycle: {' -> '.join([*path, d.name])}"
            )
        state[d.name] = "visiting"
        for dep in sorted(deps[d.name], key=[x.name for x in documents].index):
            visit(next(x for x in documents if x.name == dep), [*path, str(d.name or "final")])
        state[d.name] = "done"
        order.append(d)

    for d in documents:
        visit(d, [])
    return [(d, deps[d.name]) for d in order]


def merge_documents(
    docs: list[dict],
    path: Path | None,
    out: str | Path | None,
    intermediate_dir: str | Path | None,
    force: bool,
    dry_run: bool,
    merge_one: Callable[[dict, Path | None, Path | None, bool, bool], Path | None],
    print_fn=print,
) -> Path | None:
    """Run every document's merge in dependency order; returns the final output (or the last one written)."""
    config = str(path) if path else "<config>"
    documents = split_documents(docs, config)
    final = next((d for d in documents if d.name is None), None)
    if final is not None and out is None and not final.raw.get("out"):
        raise UserError(f"{final.where}: the unnamed (final) merge needs an output: pass OUT or -o DIR")
    if intermediate_dir is None:
        if out is None:
            raise UserError(f"{config}: pass --intermediate-dir DIR, where the named merges are written")
        intermediate_dir = Path(out).parent / f"{Path(out).name}-intermediate"
    work = Path(intermediate_dir).expanduser().resolve()
    order = run_order(documents)
    if final is not None and out is not None and not dry_run:
        check_output_free(Path(out), force)  # before any intermediate merge runs
    names = {d.name for d in documents if d.name}
    result = None
    written: set[str] = set()
    for d, deps in order:
        raw = _walk(d.raw, names, set(), work)
        target = (
            Path(out) if d.name is None and out is not None else (None if d.name is None else work / d.name)
        )
        label = d.name or "final merge"
        if d.name and target.is_dir() and (target / "config.json").is_file() and not force:
            print_fn(f"{label}: reusing {target} (pass --force to merge it again)")
            written.add(d.name)
            continue
        if dry_run and deps - written:
            print_fn(f"{label}: planned once {', '.join(sorted(deps - written))} is merged")
            continue
        print_fn(f"{label}:")
        result = merge_one(raw, path, target, force, dry_run) or result
        if d.name and not dry_run:
            written.add(d.name)
    return result
