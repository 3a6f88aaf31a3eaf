"""The `moekit` command: a thin click layer over the Python API.

User errors (moekit.errors.UserError) print one line on stderr and exit 2; an interrupt exits 130 after the
atomic writer has removed its temporary directory; anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import gc
import logging
import re
import signal
import sys
from pathlib import Path

import click

from moekit.allocator import use_huge_pages_for_tensors
from moekit.errors import UserError

use_huge_pages_for_tensors()  # before anything imports torch
log = logging.getLogger("moekit.cli")


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a plain byte count -> bytes. '5B', '500M' or '2G' are refused: mergekit users
    write '5B' for 5 billion, which as bytes would cut a model into thousands of shards."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B?)\s*", str(text).upper())
    if not m:
        raise UserError(f"--shard-size: cannot read {text!r}; use bytes or a size like 500MB or 2GB")
    number, prefix, unit = m.groups()
    if unit in ("", "I") and (prefix or unit) or unit == "B" and not prefix:
        raise UserError(
            f"--shard-size {text}: ambiguous unit; write bytes with KB/MB/GB (e.g. 5GB), or use --out-shard-size "
            "5B for mergekit's count (K/M/B = thousand/million/billion)"
        )
    base = 1024 if unit.startswith("I") else 1000
    return int(float(number) * base ** " KMGT".index(prefix or " "))


def parse_mergekit_shard_size(text: str) -> int:
    """mergekit's --out-shard-size: a count with K, M or B (thousand, million, billion). mergekit documents it
    as parameters, but its writer compares it with tensor bytes (numel x element size); so does this."""
    m = re.fullmatch(r"\s*([0-9]+)\s*([KMB]?)\s*", str(text).upper())
    if not m:
        raise UserError(f"--out-shard-size: cannot read {text!r}; use a count like 5B, 500M or 1000000")
    number, suffix = m.groups()
    return int(number) * 1000 ** " KMB".index(suffix or " ")


# How torch and Python word an allocation (or a thread start) that the memory limit refused.
OUT_OF_MEMORY_SIGNS = ("can't allocate memory", "can't start new thread", "Cannot allocate memory")


class _Terminate(BaseException):
    """Raised by the SIGTERM handler so that cleanup runs as it does for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminate()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moekit")
def cli() -> None:
    """moekit: merge models, build Mixture-of-Experts models, and see where tokens go.

    \b
    Examples:
      moekit merge merge_configs/linear.yaml -o out/linear
      moekit merge merge_configs/moe_clown.yaml --dry-run
      moekit route-stats out/moe --prompts code=code.txt --prompts legal=legal.txt --plot load.png
    """


@cli.command("merge")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out_dir", required=False, metavar="[OUT]", type=click.Path(file_okay=False))
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False),
    help="Output directory (default: OUT, else the config's `out:`).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing output (the old one is kept until the new one is complete).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Validate everything and print the plan and a memory estimate; write nothing.",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Device for MoE hidden-state gates.",
)
@click.option(
    "--shard-size",
    default="2GB",
    show_default=True,
    help="Largest output shard, in bytes (e.g. 500MB, 2GB, 1GiB).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for randomised methods (DARE, DELLA, random gates).",
)
@click.option(
    "--allow-nonfinite", is_flag=True, help="Write tensors that came out NaN/Inf instead of stopping."
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Load models that only have pickled .bin/.pt weights (with torch.load(weights_only=True)).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="More logging.")
@click.option(
    "--out-shard-size",
    help="mergekit's shard size: a count with K/M/B (e.g. 5B), compared with tensor bytes.",
)
@click.option(
    "--copy-tokenizer/--no-copy-tokenizer",
    default=True,
    show_default=True,
    help="Write a tokenizer to the output.",
)
@click.option(
    "--write-model-card/--no-write-model-card",
    default=True,
    show_default=True,
    help="Write a README.md card.",
)
@click.option(
    "--allow-crimes", is_flag=True, help="Merge models whose config.json names other architectures."
)
@click.option("--lazy-unpickle", is_flag=True, help="mergekit's pickle reader: taken as --allow-pickle.")
@click.option("--cuda", is_flag=True, help="mergekit's GPU switch: taken as --device cuda (MoE gates).")
@click.option("--random-seed", type=int, help="mergekit's name for --seed.")
@click.option("--trust-remote-code", is_flag=True, hidden=True)
@click.option(
    "--unsafe-truncate-embeddings",
    is_flag=True,
    help="mergekit's switch: embeddings of different vocabulary sizes keep the rows all inputs have (it assumes "
    "equal token ids; tokenizer_source: base matches rows by token instead).",
)
@click.option(
    "-I",
    "--intermediate-dir",
    type=click.Path(file_okay=False),
    help="Multi-document configs: where the named merges go (default: OUT-intermediate).",
)
def merge_command(
    config, out_dir, out, force, dry_run, device, shard_size, seed, allow_nonfinite, allow_pickle, quiet, verbose,
    out_shard_size, copy_tokenizer, write_model_card, allow_crimes, lazy_unpickle, cuda, random_seed,
    trust_remote_code, unsafe_truncate_embeddings, intermediate_dir,
) -> None:  # fmt: skip
    """Merge models as described by a YAML CONFIG (mergekit's format is accepted unchanged).

    \b
    Dense merges: linear, task_arithmetic, ties, dare_ties, slerp, passthrough, ...
    MoE: a mergekit-moe config (or merge_method: moe) builds a Mixtral / Qwen-MoE model.

    \b
    Example:
      moekit merge merge_configs/ties.yaml -o out/ties --seed 1
    """
    if trust_remote_code:
        raise UserError(
            "--trust-remote-code: moekit never runs code shipped with a model; merging needs only the weights and "
            "config.json, so drop the flag (an architecture moekit lacks is refused by name)"
        )
    # User errors that need no torch (the flags', then the config's) come before its import, which takes seconds.
    if out_dir is not None and out is not None and out_dir != out:
        raise UserError(f"two output directories: OUT '{out_dir}' and -o '{out}'; give one")
    if random_seed is not None and seed not in (0, random_seed):
        raise UserError(f"--seed {seed} and --random-seed {random_seed} disagree; give one")
    shard_bytes = parse_mergekit_shard_size(out_shard_size) if out_shard_size else parse_size(shard_size)
    from moekit.preflight import check_merge_config

    check_merge_config(
        config, out or out_dir, force=force, dry_run=dry_run, allow_pickle=allow_pickle or lazy_unpickle
    )
    gc.disable()  # importing torch makes ~170k objects; collecting while they appear only walks them again
    try:
        from moekit.merging.api import merge
    finally:
        gc.freeze()  # and none of them is garbage: later collections skip them
        gc.enable()
    _setup_logging(quiet, verbose)
    if lazy_unpickle and not allow_pickle:
        log.warning("--lazy-unpickle: taken as --allow-pickle (torch.load with weights_only=True)")
    if cuda and device != "cuda":
        log.warning("--cuda: taken as --device cuda; moekit's dense merges stream on the CPU")
    from moekit.options import MergeOptions

    options = MergeOptions(
        force=force, dry_run=dry_run,
        shard_size=shard_bytes, seed=seed if random_seed is None else random_seed, allow_nonfinite=allow_nonfinite,
        allow_pickle=allow_pickle or lazy_unpickle, progress=not quiet and sys.stderr.isatty(),
        device="cuda" if cuda else device, copy_tokenizer=copy_tokenizer, write_model_card=write_model_card,
        allow_crimes=allow_crimes, intermediate_dir=intermediate_dir,
        unsafe_truncate_embeddings=unsafe_truncate_embeddings,
    )  # fmt: skip
    result = merge(config, out or out_dir, options, print_fn=click.echo)
    if result is not None and not quiet:
        click.echo(f"wrote {result}")


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("moekit").setLevel(level)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the click group and maps errors to exit codes."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    level = logging.getLogger("moekit").level  # -q/-v last for this run only, also when it runs in-process
    try:
        cli.main(args=argv, prog_name="moekit", standalone_mode=False)
    except UserError as e:
        click.echo(f"moekit: error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("moekit: interrupted; no output was written", err=True)
        sys.exit(130)
    except (KeyboardInterrupt, _Terminate) as e:
        click.echo("moekit: interrupted; no output was written", err=True)
        sys.exit(143 if isinstance(e, _Terminate) else 130)
    except click.ClickException as e:
        click.echo(f"moekit: error: {e.format_message()}", err=True)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:  # the atomic writer has removed its temporary directory by now
        if isinstance(e, RuntimeError) and not any(sign in str(e) for sign in OUT_OF_MEMORY_SIGNS):
            raise
        click.echo(
            "moekit: error: out of memory (the machine's, or a limit such as ulimit -v); nothing was written: "
            "free memory or raise the limit",
            err=True,
        )
        sys.exit(2)
    finally:
        signal.signal(signal.SIGTERM, previous)
        logging.getLogger("moekit").setLevel(level)
    sys.exit(0)


# --- more commands are registered below (route-stats, ...) ---


# --- route-stats (moekit.stats) ---
@cli.command("route-stats")
@click.argument("model_dir", type=click.Path())
@click.option(
    "--prompts",
    "prompts",
    multiple=True,
    required=True,
    metavar="[LABEL=]FILE",
    help="Prompts file; repeat it. LABEL=FILE labels a set and turns on the per-label specialisation report.",
)
@click.option("--max-tokens", type=int, default=None, help="Take at most N tokens from each prompts file.")
@click.option(
    "--window",
    type=int,
    default=None,
    help="Longest token window fed to the model [default: 256, or the model's positions if fewer].",
)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Windows per forward pass.")
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False), help="Write every number and the run's metadata."
)
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), help="Write one row per (layer, expert).")
@click.option(
    "--plot",
    "plot_out",
    type=click.Path(dir_okay=False),
    help="Write a heatmap (layers x experts): .png, .pdf or .svg.",
)
@click.option("--force", is_flag=True, help="Replace existing --json/--csv/--plot files.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Load a model that only has pickled .bin weights (with torch.load(weights_only=True)).",
)
@click.option("-q", "--quiet", is_flag=True, help="No table and no progress bar.")
def route_stats_command(
    model_dir, prompts, max_tokens, window, batch_size, json_out, csv_out, plot_out, force, device,
    allow_pickle, quiet,
):  # fmt: skip
    """Show where an MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE) routes the tokens of your prompts.

    Per layer and overall: tokens per expert, load imbalance (max/mean, CV, Switch aux loss), router entropy
    and top-1 probability, dead experts, expert co-selection, and how often consecutive layers pick the same
    top-1 expert. With labelled prompt sets: each label's expert distribution, its top expert, and the mutual
    information between label and expert.

    \b
    Prompts files: a file with a blank line between two paragraphs is plain
    text (code, prose) and is read whole; any other file holds one prompt per
    line. Every prompt is encoded as the model's tokenizer encodes it (with
    the special tokens it adds, e.g. BOS) and cut into windows of at most
    --window tokens, each with those tokens; padding is never counted.

    \b
    Outputs are never written inside MODEL_DIR, an existing one is replaced only
    with --force, and each is written whole or not at all.

    \b
    Example:
      moekit route-stats out/moe --prompts code=code.txt --prompts legal=licence.txt \\
          --max-tokens 4000 --json stats.json --csv stats.csv --plot load.png
    """
    from moekit.stats.outputs import check_model_dir, check_target, resolved_outputs, write_files
    from moekit.stats.prompts import parse_prompts_option, read_prompts_file

    # Every argument is checked before torch and transformers are imported (seconds) and the model loaded.
    outputs = {"--json": json_out, "--csv": csv_out, "--plot": plot_out}
    targets = resolved_outputs(outputs, model_dir, force)  # before the run, which can take hours
    check_model_dir(model_dir)
    parsed = [parse_prompts_option(value) for value in prompts]
    if all(label is None for label, _ in parsed):
        if len(parsed) == 1:  # a missing or empty file is refused now; route_stats reads it again
            read_prompts_file(parsed[0][1])
        sources = str(parsed[0][1]) if len(parsed) == 1 else _unlabelled_sources(parsed)
    else:
        sources = _labelled_sources(parsed)
    from moekit.stats import route_stats
    from moekit.stats.report import print_report, render_plot

    stats = route_stats(
        model_dir, sources, max_tokens=max_tokens, window=window, batch_size=batch_size, device=device,
        progress=not quiet and sys.stderr.isatty(), allow_pickle=allow_pickle,
    )  # fmt: skip
    if not quiet:
        print_report(stats)
    render = {
        "--json": lambda: (stats.to_json() + "\n").encode("utf-8"),
        "--csv": lambda: stats.to_csv().encode("utf-8"),
        "--plot": lambda: render_plot(stats, targets["--plot"].suffix.lstrip(".").lower()),
    }
    contents = {}
    for option, target in targets.items():
        check_target(option, Path(outputs[option]), target, force)  # again: the run may have taken hours
        contents[target] = render[option]()
    write_files(contents)
    if not quiet:
        for option in targets:
            click.echo(f"wrote {outputs[option]}")


def _unlabelled_sources(parsed):
    from moekit.stats.prompts import PromptSource, read_prompts_file

    return [PromptSource(None, str(path), read_prompts_file(path)) for _, path in parsed]


def _labelled_sources(parsed):
    """Labelled files, several files under one label pooled; a file without a label is an error."""
    from moekit.stats.prompts import PromptSource, read_prompts_file

    by_label: dict[str, list] = {}
    for label, path in parsed:
        if label is None:
            raise UserError(f"--prompts {path}: label every prompts file (LABEL=FILE) or none of them")
        by_label.setdefault(label, []).append(path)
    return [
        PromptSource(
            label, ",".join(map(str, paths)), tuple(p for path in paths for p in read_prompts_file(path))
        )
        for label, paths in by_label.items()
    ]


# --- inspect (moekit.model_info) ---
@cli.command("inspect")
@click.argument("model_dir", type=click.Path())
@click.option(
    "--no-compare", is_flag=True, help="Do not check a table family against transformers' modeling code."
)
def inspect_command(model_dir, no_compare) -> None:
    """What moekit knows about MODEL_DIR: architecture, family, the facts it merges by (and whether each comes
    from moekit's table or was inferred from transformers' modeling code), dtypes, sizes, tied embeddings, the MoE
    layout and the tokenizer.

    \b
    Example:
      moekit inspect models/base
    """
    from moekit.model_info import describe_model

    for line in describe_model(model_dir, compare_with_inference=not no_compare):
        click.echo(line)


# --- calibrate-router (moekit.calibrate) ---
@cli.command("calibrate-router")
@click.argument("moe_dir", type=click.Path())
@click.option(
    "--data", "data", multiple=True, required=True, metavar="LABEL=FILE", help="Training text; repeat it."
)
@click.option("--heldout", "heldout", multiple=True, metavar="LABEL=FILE", help="Held-out text per label.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output model directory.")
@click.option("--steps", type=int, default=20, show_default=True, help="Optimiser steps (0: copy the model).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="AdamW learning rate of the routers.")
@click.option("--objective", default="both", show_default=True, help="lm, label or both.")
@click.option("--label-coef", type=float, default=0.3, show_default=True, help="Label loss weight.")
@click.option(
    "--balance-coef", type=float, default=0.01, show_default=True, help="Load-balancing loss weight."
)
@click.option("--z-coef", type=float, default=1e-3, show_default=True, help="Router z-loss weight.")
@click.option("--train-shared-gate", is_flag=True, help="Also train Qwen2-MoE's shared-expert gate.")
@click.option("--window", type=int, default=128, show_default=True, help="Tokens per training window.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Windows per step.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no report.")
def calibrate_router_command(moe_dir, data, heldout, out, quiet, **options):
    """Train only the routers of a clown-MoE on labelled text, and show routing before and after.

    The label objective pushes the tokens of LABEL to the expert built from LABEL's source model (the label
    names the source's directory, or a word of it: 'code' for models/smollm2-code); lm trains on next-token
    loss, its gradient taken straight through every expert (so top-1 routers learn too); both (the default)
    adds them, the label term times --label-coef. A load-balancing loss and the router z-loss are always
    added. Without --heldout, the last 10% of each label's windows are held out.

    \b
    Example:
      moekit calibrate-router out/clown --data code=train.py --data legal=LICENSE \\
          --heldout code=held.py --heldout legal=GPL -o out/clown-cal
    """
    from moekit.calibrate import calibrate_router, comparison_rows
    from moekit.stats.prompts import parse_prompts_option

    def labelled(values, flag):
        parsed = {}
        for value in values:
            label, path = parse_prompts_option(value)
            if label is None:
                raise UserError(f"{flag} {value}: give LABEL=FILE")
            if label in parsed:
                raise UserError(f"{flag} {value}: label '{label}' is given twice")
            parsed[label] = path
        return parsed

    result = calibrate_router(
        moe_dir, labelled(data, "--data"), out, heldout=labelled(heldout, "--heldout") or None,
        progress=not quiet and sys.stderr.isatty(), **options,
    )  # fmt: skip
    if not quiet:
        rows = [("held-out", "before", "after"), *comparison_rows(result.before, result.after)]
        width = max(len(r[0]) for r in rows)
        for metric, before, after in rows:
            click.echo(f"{metric:<{width}}  {before:>9}  {after:>9}")
        click.echo(f"calibrated {result.steps} steps in {result.seconds:.0f} s; wrote {result.out}")


# --- extract-lora (moekit.lora) ---
@cli.command("extract-lora")
@click.option(
    "--base", "--base-model", "base", required=True, help="Base model directory (MODEL+LORA works too)."
)
@click.option("--model", required=True, help="Fine-tuned model directory.")
@click.option(
    "-o",
    "--out",
    "--out-path",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Adapter directory to write.",
)
@click.option(
    "--rank",
    "--max-rank",
    "rank",
    type=int,
    default=128,
    show_default=True,
    help="Largest rank of a module's LoRA.",
)
@click.option(
    "--sv-epsilon", type=float, default=0.0, show_default=True, help="Drop singular values <= this."
)
@click.option(
    "--sv-relative",
    type=float,
    default=0.0,
    show_default=True,
    help="Drop singular values <= this x the largest.",
)
@click.option(
    "--distribute-scale/--no-distribute-scale",
    default=True,
    show_default=True,
    help="Split sqrt(S) over A and B (else S goes into A).",
)
@click.option(
    "--embed-lora/--no-embed-lora",
    default=False,
    show_default=True,
    help="LoRA on embeddings (else saved whole in modules_to_save).",
)
@click.option(
    "--save-module",
    "modules_to_save",
    multiple=True,
    help="Save this module (name or last name part) at full rank.",
)
@click.option(
    "-i", "--include-regex", "include", multiple=True, help="Only modules whose name matches (re.search)."
)
@click.option("-e", "--exclude-regex", "exclude", multiple=True, help="Leave out modules whose name matches.")
@click.option(
    "--skip-undecomposable",
    is_flag=True,
    help="Leave out non-2-D weights (norms) instead of saving them whole.",
)
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--allow-pickle", is_flag=True, help="Load models that only have pickled .bin/.pt weights.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no per-module table.")
def extract_lora_command(
    base, model, out, rank, sv_epsilon, sv_relative, distribute_scale, embed_lora, modules_to_save, include, exclude,
    skip_undecomposable, force, allow_pickle, quiet,
) -> None:  # fmt: skip
    """Extract a PEFT LoRA adapter (BASE + adapter ~ MODEL) by truncated SVD of each weight's delta.

    Options follow mergekit-extract-lora. Prints each module's rank and relative error ||dW - BA|| / ||dW||.

    \b
    Example:
      moekit extract-lora --base ./base --model ./finetune -o ./lora --rank 32
    """
    from moekit.lora.extract import ExtractOptions, extract_lora

    options = ExtractOptions(
        max_rank=rank, sv_epsilon=sv_epsilon, sv_relative=sv_relative, distribute_scale=distribute_scale,
        embed_lora=embed_lora, modules_to_save=tuple(modules_to_save), include=tuple(include),
        exclude=tuple(exclude), skip_undecomposable=skip_undecomposable,
    )  # fmt: skip
    result = extract_lora(
        base,
        model,
        out,
        options,
        force=force,
        allow_pickle=allow_pickle,
        progress=not quiet and sys.stderr.isatty(),
    )
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if not quiet:
        click.echo(f"{'module':<50} {'kind':<9} {'rank':>5} {'rel. error':>11}")
        for m in result.modules:
            error = f"{m.relative_error:11.3e}" if m.kind == "lora" else f"{'-':>11}"
            click.echo(f"{m.module:<50} {m.kind:<9} {m.rank or '-':>5} {error}")
        click.echo(f"wrote {result.out} (largest relative error {result.max_relative_error:.3e})")


# --- example-models (moekit.examples) ---
@cli.command("example-models")
@click.argument("config_dir", type=click.Path(file_okay=False))
@click.option(
    "--force", is_flag=True, help="Remake example models that exist, and replace other directories."
)
def example_models_command(config_dir, force) -> None:
    """Write the small local models the example configs name into CONFIG_DIR/models and CONFIG_DIR/loras.

    Paths in a config are relative to the config's folder, so with CONFIG_DIR = merge_configs every example
    there runs unchanged. The models are random stand-ins (4-layer Llama and Qwen2 bases, noisy fine-tunes,
    rank-4 LoRAs), made locally in seconds; the demo_*.yaml configs need `make demo` instead.

    \b
    Example:
      moekit example-models merge_configs && moekit merge merge_configs/ties.yaml -o out/ties
    """
    from moekit.examples import make_example_models

    make_example_models(config_dir, force=force, print_fn=click.echo)


# --- verify (moekit.verification) ---
@cli.command("verify")
@click.argument("out_dir", metavar="OUT", type=click.Path())
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    help="The config the merge ran from (it must equal the recipe): its relative paths resolve against its folder "
    "(default: the folder the output records).",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="The merge's --seed, for the rerun (default: what the output records).",
)
@click.option("--no-rerun", is_flag=True, help="Do not merge the recipe again (it needs the input models).")
@click.option("--no-load", is_flag=True, help="Do not load the model in transformers.")
def verify_command(out_dir, config, seed, no_rerun, no_load) -> None:
    """Check a merge output OUT: shards against the index, every tensor finite, shapes against config.json (the
    per-expert layout transformers 4.x and 5.x load), a transformers load, and that moekit_config.yaml merged
    again (with the seed and config folder moekit_rerun.yaml records) gives the same tensor bytes. Prints one line
    per problem and exits 1 if there is any; exit 0 when all checks pass, 2 when OUT cannot be checked at all.

    \b
    Examples:
      moekit verify out/ties
      moekit verify old/ties --config merge_configs/ties.yaml --seed 1   (an output with no moekit_rerun.yaml)
    """
    from moekit.verification import verify

    report = verify(
        out_dir, config=config, seed=seed, rerun=not no_rerun, load=not no_load, print_fn=click.echo
    )
    if not report.ok:
        click.echo(f"moekit: verify: {len(report.problems)} problem(s) in {out_dir}", err=True)
        sys.exit(1)
    click.echo(f"{out_dir}: all {len(report.passed)} checks passed")
