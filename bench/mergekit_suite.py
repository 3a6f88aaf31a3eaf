"""mergekit 0.1.5's own configs through both tools: accepted or refused, and the max abs difference, per config.

    python bench/mergekit_suite.py --examples DIR          # DIR: mergekit's examples/*.yml (from its git repo)
    python bench/mergekit_suite.py --only ties             # configs whose name contains 'ties'
    python bench/mergekit_suite.py --markdown              # the table as Markdown, for the README

The configs come from two places:
- mergekit's test suite (tests/ in its source distribution, fetched with `pip download --no-binary`): its tests
  are run in the mergekit venv with bench/mergekit_suite/common.py standing in for the unshipped tests/common.py,
  which builds the tiny random models each test names (Llama, Granite, GPT-2, LLaVA) and records every config a
  test would merge, as YAML;
- mergekit's examples/*.yml (`--examples`), with each hub id replaced by a local stand-in: a small random model
  of the architecture the id names (Llama, or Mistral when the id says so), as many layers as the config's
  layer ranges reach, stored in the config's dtype, the base model as the base and the others as its fine-tunes;
  each also in mergekit's `modules:` form (its models/slices and parameters as the module 'default').

Each config is merged by `mergekit-yaml CONFIG OUT --random-seed 0` and by `moekit merge CONFIG OUT --seed 0`,
as written, and again by moekit with `compute_dtype: mergekit` added. A config mergekit refuses for differing
vocabulary sizes runs once more with `--unsafe-truncate-embeddings` given to both tools. Columns: what each tool
did (ok, or the reason it refused), the max abs difference over all tensors in fp32 compute (moekit's default)
and with `compute_dtype: mergekit` ("0" = bit-exact: the same values, and the same dtypes, which are compared
too). A config that needs an architecture moekit lacks reads "refused: architecture". Totals at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _compare import max_abs_diff  # noqa: E402
from _models import Shape, make_family  # noqa: E402
from _peer import MERGEKIT_VERSION, PEER_ENV, bench_dir, mergekit_venv  # noqa: E402

from moekit.io.safetensors_reader import checkpoint_infos  # noqa: E402

SUITE_TESTS = ("test_basic_merges.py", "test_chat_template.py", "test_merge_dtypes.py", "test_tokenizer.py")
PYTEST_PIN = "pytest==9.2.0"
FP32_TOL = 1e-5
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Config:
    name: str
    text: str  # the YAML as mergekit reads it
    source: str  # "tests" or "examples"
    flags: tuple[str, ...] = ()  # given to both tools (a switch both spell the same)


TRUNCATE = "--unsafe-truncate-embeddings"


def with_truncation(done: list[tuple[Config, Row]]) -> list[Config]:
    """The configs mergekit refused for differing vocabulary sizes, again with --unsafe-truncate-embeddings,
    which both tools take: each input's embedding rows narrowed to the smallest vocabulary."""
    return [
        Config(f"{c.name} {TRUNCATE}", c.text, c.source, (TRUNCATE,))
        for c, r in done
        if not r.mergekit.ok and "size mismatch" in r.mergekit.why
    ]


def sdist_tests() -> Path:
    """mergekit's tests/ from its source distribution, unpacked once under the bench directory."""
    root = bench_dir() / f"mergekit-{MERGEKIT_VERSION}-sdist"
    tests = root / f"mergekit-{MERGEKIT_VERSION}" / "tests"
    if tests.is_dir():
        return tests
    root.mkdir(parents=True, exist_ok=True)
    pip = [
        str(mergekit_venv() / "python"),
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--no-binary",
        ":all:",
    ]
    subprocess.run([*pip, f"mergekit=={MERGEKIT_VERSION}", "-d", str(root)], check=True)
    with tarfile.open(root / f"mergekit-{MERGEKIT_VERSION}.tar.gz") as tar:
        tar.extractall(root, filter="data")
    return tests


def harvest_test_configs() -> list[Config]:
    """Every config mergekit's own tests hand to run_and_check_merge (see bench/mergekit_suite/common.py)."""
    work = bench_dir() / "mergekit-suite" / "tests-run"
    capture = work / "capture.jsonl"
    if not capture.is_file():
        py = str(mergekit_venv() / "python")
        if subprocess.run([py, "-c", "import pytest"], capture_output=True).returncode != 0:
            subprocess.run([py, "-m", "pip", "install", "-q", PYTEST_PIN], check=True)
        shutil.rmtree(work, ignore_errors=True)
        (work / "tests").mkdir(parents=True)
        src = sdist_tests()
        for name in SUITE_TESTS:
            shutil.copyfile(src / name, work / "tests" / name)
        (work / "tests" / "__init__.py").touch()
        shutil.copyfile(Path(__file__).parent / "mergekit_suite" / "common.py", work / "tests" / "common.py")
        env = {**os.environ, **PEER_ENV, "MOEKIT_SUITE_CAPTURE": str(capture.with_suffix(".part"))}
        args = [py, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", f"--basetemp={work / 'models'}"]
        subprocess.run(args, cwd=work, env=env, capture_output=True)  # tests expecting a merge fail here
        capture.with_suffix(".part").rename(capture)
    configs, seen = [], {}
    for line in capture.read_text().splitlines():
        record = json.loads(line)
        test = record["test"].split("::", 1)[-1].replace("::", ".")
        seen[test] = seen.get(test, 0) + 1
        configs.append(Config(f"{test}#{seen[test]}" if seen[test] > 1 else test, record["yaml"], "tests"))
    return configs


def _model_ids(cfg: dict) -> list[str]:
    ids = [cfg["base_model"]] if cfg.get("base_model") else []
    for m in cfg.get("models") or []:
        ids.append(m if isinstance(m, str) else m["model"])
    for s in cfg.get("slices") or []:
        ids.extend(src["model"] for src in s["sources"])
    return list(dict.fromkeys(ids))


def stand_ins(cfg: dict, name: str) -> dict[str, str]:
    """Hub id -> local stand-in directory for one example config."""
    ids = _model_ids(cfg)
    layers = max(
        [r for s in cfg.get("slices") or [] for src in s["sources"] for r in src["layer_range"]] or [4]
    )
    dtype = DTYPES.get(cfg.get("dtype"), torch.bfloat16)
    arch = "mistral" if any("mistral" in i.lower() for i in ids) else "llama"
    shape = Shape(vocab=512, hidden=64, intermediate=96, layers=layers, heads=4, kv_heads=2)
    root = bench_dir() / "mergekit-suite" / "stand-ins" / arch
    base = cfg.get("base_model") or ids[0]
    others = [i for i in ids if i != base]
    paths = make_family(root, shape, dtype, n_finetunes=max(len(others), 1), seed=7)
    if arch == "mistral":
        for p in paths:
            c = json.loads((p / "config.json").read_text())
            c |= {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": None}
            (p / "config.json").write_text(json.dumps(c, indent=2))
    return {base: str(paths[0])} | {i: str(p) for i, p in zip(others, paths[1:])}


def as_module(c: Config) -> Config:
    """The config in mergekit's `modules:` form: its models or slices, and its parameters, as the one module of
    a causal LM ('default'); both tools must merge it as the config itself."""
    raw = yaml.safe_load(c.text)
    module = {k: raw.pop(k) for k in ("models", "slices", "parameters") if k in raw}
    return Config(f"{c.name} as modules:", yaml.safe_dump(raw | {"modules": {"default": module}}), c.source)


def example_configs(examples: Path) -> list[Config]:
    configs = []
    for path in sorted(examples.glob("*.yml")):
        text = path.read_text()
        cfg = yaml.safe_load(text)
        mapping = stand_ins(cfg, path.stem)
        for hub_id, local in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
            text = re.sub(rf"(?<![\w/.-]){re.escape(hub_id)}(?![\w/.-])", local, text)
        configs.append(Config(f"examples/{path.name}", text, "examples"))
    return configs + [as_module(c) for c in configs]


@dataclass
class Outcome:
    ok: bool
    why: str  # the refusal, shortened


# moekit's refusals of a model kind it lacks: an unknown model_type, or a composite model (LLaVA and other VLMs)
ARCHITECTURE_REFUSAL = r"model_type .* is not supported|architecture|is a composite model"


def _refusal(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else "?"
    if re.search(ARCHITECTURE_REFUSAL, last, re.I):
        return "refused: architecture"
    last = re.sub(r"/\S+/", "", last.removeprefix("moekit: error: "))
    return "refused: " + (last[:90] + "..." if len(last) > 90 else last)


# One thread per tool: no timing is taken here, and on a busy machine idle-spinning threads only slow both tools.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_tool(cmd: list[str], env: dict | None = None) -> Outcome:
    env = {**os.environ, **PEER_ENV, **ONE_THREAD, **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return Outcome(True, "ok") if proc.returncode == 0 else Outcome(False, _refusal(proc.stderr))


@dataclass
class Row:
    name: str
    mergekit: Outcome
    moekit: Outcome
    diff: float | None
    diff_mode: float | None
    where: str
    computes_fp32: bool


def run_dir(work: Path, name: str) -> Path:
    return work / re.sub(r"[^\w.#-]+", "_", name)


def run_config(c: Config, work: Path) -> Row:
    d = run_dir(work, c.name)
    done = d / "row.json"
    if done.is_file() and json.loads(done.read_text())["text"] == c.text:
        return _row_from(json.loads(done.read_text()))
    mk = run_mergekit(c, d)
    for stale in ("moekit", "moekit-mode"):
        shutil.rmtree(d / stale, ignore_errors=True)
    cfg_path, mode_path = d / "config.yaml", d / "config_mergekit_mode.yaml"
    raw = yaml.safe_load(c.text)
    moe_cmd = [sys.executable, "-m", "moekit", "merge"]
    ours = run_tool([*moe_cmd, str(cfg_path), str(d / "moekit"), "--seed", "0", "-q", *c.flags])
    diff = diff_mode = None
    where = ""
    if mk.ok and ours.ok:
        diff, where = max_abs_diff(d / "mergekit", d / "moekit")
        mode = run_tool([*moe_cmd, str(mode_path), str(d / "moekit-mode"), "--seed", "0", "-q", *c.flags])
        if mode.ok:
            diff_mode, _ = max_abs_diff(d / "mergekit", d / "moekit-mode")
    fp32 = raw.get("dtype") in (None, "float32") and not _stored_half(raw)
    row = Row(c.name, mk, ours, diff, diff_mode, where, fp32)
    record = {"text": c.text} | {k: v for k, v in row.__dict__.items() if k not in ("mergekit", "moekit")}
    record |= {"mergekit": mk.__dict__, "moekit": ours.__dict__}
    done.write_text(json.dumps(record))
    return row


def run_mergekit(c: Config, d: Path) -> Outcome:
    """mergekit-yaml on one config, its outcome kept in mergekit.json (with the config text) and its output in
    mergekit/: a rerun after a moekit change merges only with moekit."""
    record = d / "mergekit.json"
    if record.is_file() and json.loads(record.read_text())["text"] == c.text:
        return Outcome(**json.loads(record.read_text())["outcome"])
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(c.text)
    (d / "config_mergekit_mode.yaml").write_text(c.text.rstrip() + "\ncompute_dtype: mergekit\n")
    mk = run_tool(
        [
            str(mergekit_venv() / "mergekit-yaml"),
            str(d / "config.yaml"),
            str(d / "mergekit"),
            "--random-seed",
            "0",
            *c.flags,
        ]
    )
    record.write_text(json.dumps({"text": c.text, "outcome": mk.__dict__}))
    return mk


def _row_from(record: dict) -> Row:
    """A finished run, as row.json keeps it: a rerun only merges the configs it has not merged yet."""
    fields = {k: v for k, v in record.items() if k != "text"}
    fields["mergekit"], fields["moekit"] = Outcome(**fields["mergekit"]), Outcome(**fields["moekit"])
    return Row(**fields)


def _stored_half(raw: dict) -> bool:
    """True when the inputs are stored in half precision (mergekit then computes in it without `dtype`)."""
    for ref in _model_ids(raw):
        cfg = Path(ref) / "config.json"
        if not cfg.is_file():
            continue
        stored = json.loads(cfg.read_text())
        # transformers 5 writes `dtype`, 4.x wrote `torch_dtype`
        if (stored.get("dtype") or stored.get("torch_dtype")) in ("bfloat16", "float16"):
            return True
    return False


def dtype_mismatch(a: Path, b: Path) -> str | None:
    """The first tensor two outputs store in different dtypes ("name: A vs B"), or None: bit-exact means the
    same values in the same dtype."""
    if not (a.is_dir() and b.is_dir()):
        return None
    ia, ib = checkpoint_infos(a), checkpoint_infos(b)
    for name in sorted(ia.keys() & ib.keys()):
        if ia[name].dtype != ib[name].dtype:
            return f"{name}: {ia[name].dtype} vs {ib[name].dtype}".replace("torch.", "")
    return None


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else f"{x:.1e}"


def print_table(rows: list[Row], markdown: bool, work: Path) -> None:
    head = ["config", "mergekit", "moekit", "max |Δ| fp32 compute", "max |Δ| compute_dtype: mergekit"]
    # the outputs stay on disk beside row.json: their dtypes are compared here, so kept rows are checked too
    mismatch = {
        r.name: dtype_mismatch(run_dir(work, r.name) / "mergekit", run_dir(work, r.name) / "moekit-mode")
        for r in rows
    }
    body = [
        [
            r.name,
            r.mergekit.why,
            r.moekit.why,
            _fmt(r.diff),
            _fmt(r.diff_mode) + (f" (dtype {m})" if (m := mismatch[r.name]) else ""),
        ]
        for r in rows
    ]
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for b in body:
            print("| " + " | ".join(x.replace("|", "\\|") for x in b) + " |")
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        for line in [head, ["-" * w for w in widths], *body]:
            print("  ".join(x.ljust(w) for x, w in zip(line, widths)))
    merged = [r for r in rows if r.mergekit.ok]
    ours = [r for r in merged if r.moekit.ok]
    # rows kept from before a refusal was recognised as one are classified again here
    arch = [r for r in merged if not r.moekit.ok and re.search(ARCHITECTURE_REFUSAL, r.moekit.why, re.I)]
    fp32 = [r for r in ours if r.computes_fp32]
    within = [r for r in fp32 if r.diff is not None and r.diff <= FP32_TOL]
    exact = [r for r in ours if r.diff_mode == 0 and not mismatch[r.name]]
    print()
    print(f"configs: {len(rows)}; mergekit merged {len(merged)}, refused {len(rows) - len(merged)}")
    print(
        f"of the {len(merged)} mergekit merged: moekit merged {len(ours)}, refused {len(merged) - len(ours)} "
        f"({len(arch)} for an architecture moekit lacks)"
    )
    print(f"fp32 compute: {len(within)} of {len(fp32)} fp32 configs within {FP32_TOL:g}")
    print(f"compute_dtype: mergekit: {len(exact)} of {len(ours)} bit-exact (same values, same dtypes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=Path, help="mergekit's examples/ folder (from its git repository)")
    ap.add_argument("--only", help="run only configs whose name contains this")
    ap.add_argument("--jobs", type=int, default=2, help="configs run at once")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--report", action="store_true", help="print the configs already run; run nothing")
    args = ap.parse_args()
    configs = harvest_test_configs() + (example_configs(args.examples) if args.examples else [])
    if args.only:
        configs = [c for c in configs if args.only in c.name]
    work = bench_dir() / "mergekit-suite" / "runs"
    if args.report:
        done = kept(configs, work)
        done += kept(with_truncation(done), work)
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            done = list(zip(configs, pool.map(lambda c: run_config(c, work), configs)))
            again = with_truncation(done)
            done += list(zip(again, pool.map(lambda c: run_config(c, work), again)))
    print_table([r for _, r in done], args.markdown, work)


def kept(configs: list[Config], work: Path) -> list[tuple[Config, Row]]:
    """The configs already run, with their rows."""
    found = [(c, run_dir(work, c.name) / "row.json") for c in configs]
    return [(c, _row_from(json.loads(f.read_text()))) for c, f in found if f.is_file()]


if __name__ == "__main__":
    main()
