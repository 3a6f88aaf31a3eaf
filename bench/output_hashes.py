"""Byte-identity check for refactors: merge every merge_configs/*.yaml with the CLI and hash every output file.

    python bench/output_hashes.py --work DIR --save before.json        # on the old commit
    python bench/output_hashes.py --work DIR --compare before.json     # on the new one; exit 1 on any difference

The example models are made in DIR/models and DIR/loras by moekit's seeded tiny-model helpers, so two commits see
the same bytes; the configs are copied into DIR unchanged and merged there with `moekit merge CONFIG -o OUT`, so
their relative model paths resolve as a user's would. `--also CONFIG` adds more configs (e.g. the demo's
SmolLM2 merges under $MOEKIT_CACHE/demo/configs) merged in place. Outputs go to DIR/out/NAME, replaced each run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA_SOURCES = {"base": 0, "chat": 1, "code": 2, "math": 3, "legal": 4}
QWEN2_SOURCES = {"qwen2-base": 5, "qwen2-code": 6, "qwen2-math": 7}
LORAS = ("code", "math", "chat")


def make_models(work: Path) -> None:
    """The models the example configs name (./models/*, ./loras/*), unless already there."""
    from moekit.demo.tiny_models import make_base, make_finetune
    from moekit.lora.extract import ExtractOptions, extract_lora

    models = work / "models"
    if (models / ".done").exists():
        return
    shutil.rmtree(models, ignore_errors=True)
    shutil.rmtree(work / "loras", ignore_errors=True)
    base = make_base(models / "base", seed=LLAMA_SOURCES["base"])
    for name, seed in LLAMA_SOURCES.items():
        if name != "base":
            make_finetune(base, models / name, seed=seed)
    qbase = make_base(models / "qwen2-base", seed=QWEN2_SOURCES["qwen2-base"], model_type="qwen2")
    for name, seed in QWEN2_SOURCES.items():
        if name != "qwen2-base":
            make_finetune(qbase, models / name, seed=seed)
    only_lora = ExtractOptions(max_rank=4, exclude=("embed_tokens", "lm_head"), skip_undecomposable=True)
    for name in LORAS:
        extract_lora(str(base), str(models / name), work / "loras" / name, only_lora)
    (models / ".done").touch()


def file_hashes(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def run_config(config: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "moekit", "merge", str(config), "-o", str(out), "--seed", "1", "-q"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=config.parent)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        return {"rc": done.returncode, "error": done.stderr.strip()[-500:], "seconds": seconds}
    return {"rc": 0, "files": file_hashes(out), "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the models, configs and outputs")
    ap.add_argument("--save", type=Path, help="write the hashes here")
    ap.add_argument("--compare", type=Path, help="compare against hashes saved earlier")
    ap.add_argument("--also", type=Path, nargs="*", default=[], help="more configs, merged where they lie")
    ap.add_argument("--only", nargs="*", help="config stems to run (default: all)")
    args = ap.parse_args()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    make_models(work)
    configs = []
    for src in sorted((REPO / "merge_configs").glob("*.yaml")):
        if src.name.startswith("demo_"):  # they name the demo's SmolLM2 models: pass them with --also
            continue
        shutil.copyfile(src, work / src.name)
        configs.append(work / src.name)
    configs += [p.resolve() for p in args.also]
    if args.only:
        configs = [c for c in configs if c.stem in args.only]

    results = {}
    for config in configs:
        key = config.stem if config.parent == work else str(config)
        results[key] = run_config(config, work / "out" / key.replace("/", "_"))
        r = results[key]
        state = f"{len(r['files'])} files" if r["rc"] == 0 else f"rc {r['rc']}: {r['error'][-200:]}"
        print(f"{key:60s} {r['seconds']:7.1f} s  {state}", flush=True)
    if args.save:
        args.save.write_text(json.dumps(results, indent=1, sort_keys=True))
    if not args.compare:
        return 0

    before = json.loads(args.compare.read_text())
    differing = 0
    print(f"\n{'config':60s} {'files':>5s} {'same':>5s}  differing")
    for key in sorted(set(before) | set(results)):
        a, b = before.get(key), results.get(key)
        if a is None or b is None:
            print(f"{key:60s} only in {'after' if a is None else 'before'}")
            differing += 1
            continue
        if a["rc"] != 0 or b["rc"] != 0:
            same_error = a["rc"] == b["rc"]
            print(f"{key:60s} rc before {a['rc']}, after {b['rc']}{'' if same_error else '  <-- differs'}")
            differing += not same_error
            continue
        names = sorted(set(a["files"]) | set(b["files"]))
        bad = [n for n in names if a["files"].get(n) != b["files"].get(n)]
        print(f"{key:60s} {len(names):5d} {len(names) - len(bad):5d}  {' '.join(bad)}")
        differing += bool(bad)
    print(f"\n{len(set(before) | set(results))} configs, {differing} with differences")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
