"""`moekit verify OUT`: is a merge's output whole, loadable, and what its recipe makes? (The module is not named
`verify` so that it cannot shadow the `moekit.verify` function once imported.)

Five checks, each reporting every problem it finds as one line (what, where, how to fix):

- files: the shards against the index: every file the index lists exists inside OUT and holds the tensors the
  index maps to it, every tensor is in exactly one shard, and no shard or tensor is left out of the index;
- finite: every floating-point tensor, read one at a time, holds no NaN or inf;
- shapes: the tensors against a model of config.json's architecture built on the meta device (no memory), in the
  per-expert layout that transformers 4.x loads and 5.x converts on load (transformers' own reverse conversion
  gives the names); fused transformers-5 expert names are a problem, since 4.x would load them as random weights;
- loads: transformers' from_pretrained reports no missing, unexpected or mismatched weights, and a forward pass
  on a few tokens gives finite logits;
- recipe: `moekit_config.yaml` merged again into a temporary directory gives the same tensors: the same names,
  dtypes, shapes and bytes (sha256 of each tensor's raw bytes), and the same config.json. Files around the
  weights (the model card, the recipe itself, the shard split) are not compared.

The recipe holds the config as given; `moekit_rerun.yaml` beside it records the rest of what the rerun needs:
the merge's seed, the options that change its tensors, and the folder its relative paths resolved against
(relative to the output, so that it keeps working when the output moves with its inputs, and an uploaded folder
carries no absolute path). `seed` and `config` (the file the merge ran from, which must equal the recipe; its
folder is then the base) override the record; outputs of moekit versions that wrote no record need them.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from moekit import transformers_io
from moekit.errors import UserError, did_you_mean
from moekit.io.output_files import MARKER_NAME, RERUN_NAME, RERUN_OPTIONS
from moekit.io.safetensors_reader import (
    INDEX_NAME,
    TensorInfo,
    TensorReader,
    read_header,
    read_weight_map,
    safe_child,
)

MAX_LINES_PER_CHECK = 20  # a broken merge can break every tensor; the first lines say what happened
PROBE_TOKENS = 8


@dataclass
class VerifyReport:
    """What `verify` found: `problems` (one line each; empty when the output is good) and what was checked."""

    out: Path
    problems: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    out: str | Path,
    *,
    config: str | Path | None = None,
    seed: int | None = None,
    rerun: bool = True,
    load: bool = True,
    print_fn: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Check the merge output `out` (see the module doc). `config` and `seed` are the original merge's, for the
    recipe's rerun (default: what moekit_rerun.yaml records; without one, no config and seed 0); `rerun=False`
    and `load=False` skip the two slow checks. Bad input (no such directory, an adapter) raises UserError;
    problems with the output are returned in the report."""
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out}: no such directory; give a model directory that moekit merge wrote")
    if (out / "adapter_config.json").is_file() and not (out / "config.json").is_file():
        raise UserError(f"{out}: a LoRA adapter; verify checks model directories (load it with peft instead)")
    report = VerifyReport(out)
    say = print_fn or (lambda _: None)

    def run(name: str, check: Callable[[list[str]], str]) -> None:
        problems: list[str] = []
        try:
            summary = check(problems)
        except UserError as e:
            problems.append(str(e))
            summary = None
        shown = problems[:MAX_LINES_PER_CHECK]
        if len(problems) > len(shown):
            shown.append(f"{name}: ... and {len(problems) - len(shown)} more problems of this kind")
        report.problems += shown
        for line in shown:
            say(f"problem: {line}")
        if not problems and summary:
            report.passed.append(f"{name}: {summary}")
            say(f"ok: {name}: {summary}")

    infos: dict[str, TensorInfo] = {}
    indexed: set[str] = set()  # tensors the index names, read or not: a lost shard is reported once, as lost
    run("files", lambda p: _check_files(out, infos, p, indexed))
    if infos:
        run("finite", lambda p: _check_finite(infos, p))
    config_json = _read_config(out, report, say)
    if config_json is not None and infos:
        run("shapes", lambda p: _check_shapes(out, config_json, infos, indexed, p))
        if load:
            run("loads", lambda p: _check_loads(out, p))
    if rerun:
        run("recipe", lambda p: _check_recipe(out, config, seed, infos, config_json, p))
    return report


def _read_config(out: Path, report: VerifyReport, say) -> dict | None:
    path = out / "config.json"
    try:
        config = json.loads(path.read_text())
        if isinstance(config, dict):
            return config
        problem = f"{path}: not a JSON object"
    except FileNotFoundError:
        problem = f"{path}: missing; transformers cannot load the model without it"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"{path}: not valid JSON ({e})"
    report.problems.append(problem)
    say(f"problem: {problem}")
    return None


# --- files ---------------------------------------------------------------------------------------------------


def _check_files(out: Path, infos: dict[str, TensorInfo], problems: list[str], indexed: set[str]) -> str:
    """Fill `infos` with every tensor found (the first shard holding it) and `indexed` with the tensors the index
    names, and note every disagreement."""
    files = sorted(p.name for p in out.glob("*.safetensors"))
    index_path = out / INDEX_NAME
    weight_map = read_weight_map(index_path) if index_path.is_file() else None
    listed = sorted({str(f) for f in weight_map.values()}) if weight_map else []
    indexed.update(weight_map or ())
    holders: dict[str, list[str]] = {}
    for name in sorted(set(files) | set(listed)):
        try:
            path = safe_child(out, name, str(index_path))
        except UserError as e:
            problems.append(str(e))
            continue
        if not path.is_file():
            held = next(t for t, f in weight_map.items() if f == name)
            problems.append(f"{index_path}: shard '{name}' (holding '{held}') is missing")
            continue
        try:
            header = read_header(path)
        except UserError as e:
            problems.append(str(e))
            continue
        for tensor, info in header.items():
            holders.setdefault(tensor, []).append(name)
            infos.setdefault(tensor, info)
    for tensor, shards in holders.items():
        if len(shards) > 1:
            problems.append(
                f"{out}: tensor '{tensor}' is in {len(shards)} shards ({', '.join(shards)}); keep one"
            )
    if weight_map is None:
        if len(files) > 1:
            problems.append(
                f"{out}: {len(files)} safetensors files but no {INDEX_NAME}; transformers reads one"
            )
        elif not files:
            problems.append(f"{out}: no weights (no *.safetensors file)")
        return f"{len(infos)} tensors in {len(files)} file"
    for name in sorted(set(files) - set(listed)):
        problems.append(f"{index_path}: shard '{name}' is in the directory but not in the index")
    for tensor, shard in weight_map.items():
        held_by = holders.get(tensor)
        if held_by is None:
            if (out / str(shard)).is_file():
                problems.append(
                    f"{index_path}: tensor '{tensor}' is mapped to '{shard}', which does not hold it"
                )
        elif shard not in held_by:
            problems.append(
                f"{index_path}: tensor '{tensor}' is mapped to '{shard}' but is in '{held_by[0]}'"
            )
    for tensor, shards in holders.items():
        if tensor not in weight_map:
            problems.append(f"{index_path}: tensor '{tensor}' (in '{shards[0]}') is not in the index")
    return f"{len(infos)} tensors in {len(listed)} shards, each listed in the index once"


# --- finite --------------------------------------------------------------------------------------------------


def _check_finite(infos: dict[str, TensorInfo], problems: list[str]) -> str:
    reader = TensorReader(infos)
    checked = 0
    try:
        for name, info in infos.items():
            if not info.dtype.is_floating_point:
                continue
            try:
                tensor = reader.read(name).float()
            except UserError as e:
                problems.append(str(e))
                continue
            bad = tensor.numel() - int(torch.isfinite(tensor).sum())
            if bad:
                nan = int(torch.isnan(tensor).sum())
                problems.append(
                    f"{info.path}: tensor '{name}' has {bad} non-finite values of {tensor.numel()} ({nan} NaN, "
                    f"{bad - nan} inf)"
                )
            checked += 1
    finally:
        reader.close()
    return f"all {checked} floating-point tensors finite"


# --- shapes --------------------------------------------------------------------------------------------------


def _meta_model(config_dir: Path):
    from transformers import AutoModelForCausalLM

    hf_config = transformers_io.load_config(config_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)


def expected_tensors(
    config_dir: Path,
) -> tuple[str, dict[str, tuple[int, ...]], dict[str, tuple[int, ...]], set]:
    """(class name, per-expert-layout shapes, transformers-5 in-memory shapes, tied names) of the model that
    config.json describes, from a model built on the meta device."""
    from transformers.core_model_loading import revert_weight_conversion

    model = _meta_model(config_dir)
    state = model.state_dict()
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.setdefault(id(param), name)
    on_disk = revert_weight_conversion(model, dict(state))
    as_shapes = lambda d: {k: tuple(v.shape) for k, v in d.items()}  # noqa: E731
    return type(model).__name__, as_shapes(on_disk), as_shapes(state), tied


def _check_shapes(
    out: Path, config: dict, infos: dict[str, TensorInfo], indexed: set[str], problems: list[str]
) -> str:
    try:
        cls, expected, in_memory, tied = expected_tensors(out)
    except (ValueError, KeyError, TypeError, OSError) as e:
        problems.append(
            f"{out / 'config.json'}: transformers cannot build a model from it ({str(e).splitlines()[0]})"
        )
        return ""
    held = {name: info.shape for name, info in infos.items()}
    fused = sorted(set(held) & (set(in_memory) - set(expected)))
    if fused:  # then the rest is compared in that layout too, so the one cause is reported once
        problems.append(
            f"{out}: tensor '{fused[0]}' (and {len(fused) - 1} more) uses transformers 5's fused in-memory layout; "
            "transformers 4.x loads such a file with random experts: write the per-expert names"
        )
        expected = in_memory
    for name in sorted(set(expected) - set(held) - tied - indexed):
        problems.append(f"{out}: tensor '{name}' is missing (a {cls} has it, shape {list(expected[name])})")
    for name in sorted(set(held) - set(expected)):
        problems.append(f"{out}: tensor '{name}' is not part of a {cls} built from config.json")
    for name in sorted(set(held) & set(expected)):
        if tuple(held[name]) != expected[name]:
            problems.append(
                f"{infos[name].path}: tensor '{name}' has shape {list(held[name])}, but config.json makes it "
                f"{list(expected[name])}"
            )
    return f"{len(held)} tensors match a {cls} built from config.json (per-expert layout: transformers 4.x and 5.x)"


# --- loads ---------------------------------------------------------------------------------------------------


def _check_loads(out: Path, problems: list[str]) -> str:
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar would interleave with the report's lines
    try:
        model, info = transformers_io.load_model(out, dtype="auto", output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding, reported in one line
        problems.append(
            f"{out}: transformers cannot load it: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        )
        return ""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(kind) or ()))
        if keys:
            problems.append(
                f"{out}: transformers {transformers.__version__} reports {len(keys)} {kind.replace('_', ' ')} on "
                f"load, e.g. {keys[0]}"
            )
    vocab = model.config.get_text_config().vocab_size
    tokens = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.float()(tokens).logits
    if not torch.isfinite(logits).all():
        problems.append(f"{out}: a forward pass on {PROBE_TOKENS} tokens gives non-finite logits")
    return (
        f"loads in transformers {transformers.__version__} with no missing, unexpected or mismatched weights"
    )


# --- recipe --------------------------------------------------------------------------------------------------


def _check_recipe(
    out: Path,
    config: str | Path | None,
    seed: int | None,
    infos: dict,
    config_json: dict | None,
    problems: list[str],
) -> str:
    from moekit.merging.api import merge

    recipe_path = out / MARKER_NAME
    if not recipe_path.is_file():
        problems.append(f"{recipe_path}: missing; without the recipe the merge cannot be rerun")
        return ""
    try:
        recipe = yaml.safe_load(recipe_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        problems.append(f"{recipe_path}: not readable YAML ({str(e).splitlines()[0]})")
        return ""
    record = read_rerun_record(out)
    if config is not None:
        given = yaml.safe_load(Path(config).read_text()) if Path(config).is_file() else None
        if given is None:
            raise UserError(f"--config {config}: no such config file")
        if given != recipe:
            problems.append(f"{recipe_path}: differs from {config}; the output was not made by that config")
            return ""
    options = {k: v for k, v in (record or {}).items() if k in RERUN_OPTIONS}
    if seed is None:
        seed = record["seed"] if record else 0
    relative_to = out / record["paths_relative_to"] if record and config is None else None
    with tempfile.TemporaryDirectory(prefix=".moekit-verify-", dir=out.parent) as tmp:
        again = Path(tmp) / "rerun"
        try:
            merge(
                config if config is not None else recipe,
                again,
                seed=seed,
                relative_to=relative_to,
                print_fn=lambda *_: None,
                **options,
            )
        except UserError as e:
            if config is not None:
                hint = ""
            elif record:
                hint = (
                    f"; its relative paths resolved against {relative_to} ({RERUN_NAME}'s paths_relative_to): if "
                    "the inputs moved, pass --config (the file it ran from)"
                )
            else:
                hint = (
                    f"; this output has no {RERUN_NAME} (an older moekit wrote none): if its paths are relative, "
                    "pass --config (the file it ran from)"
                )
            problems.append(f"{recipe_path}: cannot rerun the recipe: {e}{hint}")
            return ""
        redo: dict[str, TensorInfo] = {}
        _check_files(again, redo, [], set())
        differ = _compare_tensors(infos, redo, recipe_path, problems)
        if differ and record is None and seed == 0:  # first, so that the cut to MAX_LINES_PER_CHECK keeps it
            problems.insert(
                0,
                f"{recipe_path}: no {RERUN_NAME} records the merge's seed (an output of an older moekit): if the "
                "merge ran with --seed N, verify with --seed N",
            )
        redo_config = json.loads((again / "config.json").read_text())
        if config_json is not None and redo_config != config_json:
            keys = sorted(
                k for k in set(redo_config) | set(config_json) if redo_config.get(k) != config_json.get(k)
            )
            problems.append(
                f"{out / 'config.json'}: differs from the recipe's rerun in {', '.join(keys[:5])}"
            )
    return f"rerun (seed {seed}) gives the same bytes for all {len(redo)} tensors and the same config.json"


def read_rerun_record(out: Path) -> dict | None:
    """What moekit_rerun.yaml records (None when there is none: an older moekit's output), with gate_dtype as a
    torch dtype; a record that is not what moekit writes is a UserError that says how to go on without it."""
    from moekit.config import parse_dtype

    path = out / RERUN_NAME
    if not path.is_file():
        return None
    fix = "fix or delete it, and pass --seed and --config (the file the merge ran from)"
    try:
        record = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not readable YAML ({str(e).splitlines()[0]}); {fix}") from None
    kinds = {
        "seed": int,
        "paths_relative_to": str,
        "allow_crimes": bool,
        "unsafe_truncate_embeddings": bool,
        "gate_dtype": str,
    }
    if not isinstance(record, dict) or not {"seed", "paths_relative_to"} <= set(record):
        raise UserError(f"{path}: needs a mapping with seed and paths_relative_to; {fix}")
    for key, value in record.items():
        kind = kinds.get(key)
        if kind is None:
            raise UserError(
                f"{path}: unknown key '{key}'{did_you_mean(key, kinds)} (moekit writes {', '.join(kinds)}); {fix}"
            )
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"{path}: {key} must be a {kind.__name__}, got {value!r}; {fix}")
    if "gate_dtype" in record:
        record["gate_dtype"] = parse_dtype(record["gate_dtype"], f"{path}: gate_dtype")
    return record


def _compare_tensors(held: dict, redo: dict, recipe_path: Path, problems: list[str]) -> int:
    """Note every tensor the output and the rerun disagree on; returns how many differ in their bytes."""
    for name in sorted(set(redo) - set(held)):
        problems.append(f"{recipe_path}: the rerun makes tensor '{name}', which the output lacks")
    for name in sorted(set(held) - set(redo)):
        problems.append(f"{recipe_path}: the output has tensor '{name}', which the rerun does not make")
    ours, theirs = TensorReader(held), TensorReader(redo)
    differ = 0
    try:
        for name in sorted(set(held) & set(redo)):
            a, b = held[name], redo[name]
            if (a.dtype, a.shape) != (b.dtype, b.shape):
                problems.append(
                    f"{a.path}: tensor '{name}' is {a.dtype} {list(a.shape)}, the rerun's {b.dtype} {list(b.shape)}"
                )
            elif _digest(ours, name) != _digest(theirs, name):
                differ += 1
                problems.append(f"{a.path}: tensor '{name}' differs from the recipe's rerun")
    finally:
        ours.close()
        theirs.close()
    return differ


def _digest(reader: TensorReader, name: str) -> str:
    tensor = reader.read(name)
    return hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
