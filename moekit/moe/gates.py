"""Router initialisation: one vector per (layer, expert), computed as mergekit-moe 0.1.5 computes it.

- hidden: the hidden state of the last token entering each layer, averaged over the positive prompts, minus the
  same for the negative prompts, then L2-normalised.
- hidden_avg: the same with the mean over all positions of the padded batch (mergekit divides by the padded length
  and includes pad positions; we keep that, so the numbers match).
- cheap_embed: the L2-normalised sum of the prompts' token embeddings (pads masked), the same for every layer;
  positive minus negative, normalised again.
- random: N(0, 1). uniform_random: U(-1/sqrt(H), 1/sqrt(H)), torch.nn.Linear's default init.

Prompts get the BOS token as text and are left-padded with BOS as the pad token, as mergekit does. mergekit pads
each expert's prompt list as one batch; we run batches of `batch_size` prompts but pad every batch to the longest
prompt of the list, so each prompt sees exactly the input it would see in mergekit's single batch. Random gates
draw from a generator seeded with `seed` in mergekit's shape (layers, experts + shared, hidden), which is the
stream mergekit-moe draws with `--random-seed seed`.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit import transformers_io
from moekit.errors import UserError
from moekit.progress import progress_bar, transformers_bars

EMBED_NAME = "model.embed_tokens.weight"


@dataclass(frozen=True)
class PromptSet:
    """The prompts one router vector is computed from."""

    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()


def random_gates(mode: str, num_layers: int, num_vectors: int, hidden: int, seed: int) -> torch.Tensor:
    """(layers, vectors, hidden) float32 router vectors for gate_mode random or uniform_random."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_layers, num_vectors, hidden)
    if mode == "random":
        return torch.randn(shape, generator=g)
    scale = math.sqrt(1.0 / hidden)
    return torch.rand(shape, generator=g) * 2 * scale - scale


def prompt_gates(
    mode: str,
    model_dir: Path,
    embed: Callable[[], torch.Tensor],
    prompt_sets: Sequence[PromptSet],
    num_layers: int,
    *,
    device: str = "cpu",
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """(layers, len(prompt_sets), hidden) float32 router vectors for hidden, hidden_avg or cheap_embed.

    `embed` returns the base's embedding matrix (read only for cheap_embed). Hidden modes load the base model
    with transformers (never with remote code) in `dtype` on `device`; mergekit uses bfloat16 (and bfloat16 here
    gives its numbers to the bit), float32 is the default.
    """
    tokenizer = load_tokenizer(model_dir)
    tokenized = [
        (tokenize(tokenizer, s.positive), tokenize(tokenizer, s.negative) if s.negative else None)
        for s in prompt_sets
    ]
    if mode == "cheap_embed":
        table = embed().float()
        vectors = [
            _normalized_difference(lambda rows: _cheap_embedding(table, rows, batch_size), pos, neg)
            for pos, neg in tokenized
        ]
        return torch.stack(vectors, dim=1).expand(num_layers, -1, -1).contiguous()

    vectors = _hidden_vectors(
        model_dir, tokenized, tokenizer.pad_token_id, mode, device, batch_size, dtype, progress
    )
    gc.collect()  # the base model is gone once _hidden_vectors returns; give its memory back before the write
    return torch.stack(vectors, dim=1).float()  # (layers, vectors, hidden)


def _hidden_vectors(
    model_dir, tokenized, pad_id, mode, device, batch_size, dtype, progress
) -> list[torch.Tensor]:
    model = load_model(model_dir, device, dtype, progress)
    rows = model.get_input_embeddings().num_embeddings
    for pos, neg in tokenized:
        top = max(max(row) for row in pos + (neg or []))
        if top >= rows:
            raise UserError(
                f"{model_dir}: the tokenizer gives the router prompts token id {top} but the model's embedding has "
                f"only {rows} rows; the tokenizer does not belong to this model: fix vocab_size or the tokenizer files"
            )
    n_batches = sum(
        _batches(len(pos), batch_size) + (_batches(len(neg), batch_size) if neg else 0)
        for pos, neg in tokenized
    )
    with progress_bar("router prompts", n_batches, progress, "batches") as advance:

        def mean_hidden(rows):
            return _mean_hidden(model, rows, pad_id, mode == "hidden_avg", device, batch_size, advance)

        return [_normalized_difference(mean_hidden, pos, neg) for pos, neg in tokenized]


def _normalized_difference(summarize, positive, negative) -> torch.Tensor:
    v = summarize(positive)
    if negative is not None:
        v = v - summarize(negative)
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def load_tokenizer(model_dir: Path):
    """The base's tokenizer, set up as mergekit sets it: left padding, BOS as the pad token (EOS without a BOS)."""
    try:
        tok = transformers_io.load_tokenizer(model_dir)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(
            f"{model_dir}: prompt-based gates need the base model's tokenizer, which cannot be loaded ({str(e).splitlines()[0]})"
        ) from None
    tok.padding_side = "left"
    if tok.bos_token_id is not None:
        tok.pad_token_id = tok.bos_token_id
    elif tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    else:
        raise UserError(f"{model_dir}: the tokenizer has neither a BOS nor an EOS token to pad prompts with")
    return tok


def tokenize(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of BOS + prompt for each prompt, unpadded (mergekit prepends the BOS text, no other specials)."""
    bos = tokenizer.bos_token or ""
    ids = tokenizer([bos + p for p in prompts], add_special_tokens=False)["input_ids"]
    for p, row in zip(prompts, ids):
        if not row:
            raise UserError(
                f"prompt {p!r} has no tokens (and the tokenizer has no BOS token); give a non-empty prompt"
            )
    return [list(row) for row in ids]


def left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each row padded on the left to `length`."""
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, length - len(row) :] = 1
    return ids, mask


def load_model(model_dir: Path, device: str, dtype: torch.dtype, progress: bool = False):
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    try:
        with transformers_bars(progress), _load_report_silenced():
            model = transformers_io.load_model(model_dir, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: weights unlike the config
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "mismatched_sizes" in why:
            why = "the shapes of its weights are not the ones its config.json implies"
        raise UserError(f"{model_dir}: cannot load the base model for hidden-state gates ({why})") from None
    return model.to(device).eval()


@contextmanager
def _load_report_silenced() -> Iterator[None]:
    """transformers logs a multi-line load report before it raises on mismatched weights; the one-line error
    that follows says what went wrong, so the report is held back (errors still get through)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _mean_hidden(model, rows, pad_id, average_positions, device, batch_size, advance) -> torch.Tensor:
    """(layers, hidden): per layer, the mean over prompts of the last (or the mean) hidden state entering it.

    The arithmetic stays in the model's dtype, as in mergekit: with a bfloat16 base and one batch per prompt list
    the result is mergekit's to the bit."""
    length = max(len(r) for r in rows)
    total = None
    for start in range(0, len(rows), batch_size):
        ids, mask = left_pad(rows[start : start + batch_size], length, pad_id)
        try:
            with torch.no_grad():
                out = model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    output_hidden_states=True,
                    use_cache=False,
                )
        except (RuntimeError, IndexError) as e:  # a model whose weights or config transformers cannot run
            raise UserError(
                f"the base model failed on the router prompts ({str(e).splitlines()[0][:200]}); check that it "
                "loads and generates with transformers"
            ) from None
        states = torch.stack(
            out.hidden_states[:-1]
        )  # (layers, batch, length, hidden): the input of each layer
        per_prompt = states.sum(dim=2) / length if average_positions else states[:, :, -1, :]
        part = per_prompt.sum(dim=1).cpu()  # in the model's dtype, as mergekit computes it
        total = part if total is None else total + part
        advance()
    return total / len(rows)


def _cheap_embedding(table: torch.Tensor, rows, batch_size: int) -> torch.Tensor:
    """(1, hidden): the L2-normalised sum of the prompts' token embeddings."""
    vocab = table.shape[0]
    total = torch.zeros(table.shape[1])
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids = torch.tensor([i for row in chunk for i in row], dtype=torch.long)
        if ids.numel() and int(ids.max()) >= vocab:
            raise UserError(
                f"cheap_embed: the tokenizer produced token id {int(ids.max())} but the base's embedding has {vocab} rows"
            )
        total += table[ids].sum(dim=0)
    total = total.unsqueeze(0)
    return total / total.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)
