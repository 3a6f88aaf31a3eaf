"""Merging models whose tokenizers differ: `tokenizer_source: base | union | MODEL_PATH` (or `tokenizer: {source,
tokens, pad_to_multiple_of}`, whose source defaults to union), with mergekit 0.1.5's rules.

The output vocabulary is the chosen tokenizer's:
- `base`: the base model's tokenizer, stripped of tokens whose id is >= the base's `vocab_size` (mergekit's
  "stripped" tokenizer). Without a base_model, the first model.
- `union`: the stripped base tokenizer, plus every other model's tokens it lacks (plain tokens first, then added
  tokens with their settings, the first model's settings winning).
- a path: that model's tokenizer, as it is.
The output has one row per token (rounded up by `tokenizer.pad_to_multiple_of`), so `base` can shrink an embedding
whose config reserves more rows than the tokenizer uses, exactly as mergekit does.

Before the merge method sees a vocabulary-indexed tensor (embed_tokens, lm_head), each input is re-laid in the
output's token order. A token the model has keeps its own row. A token it lacks gets a fallback row shared by every
model that lacks it: the row of the only model that has it; else the base model's row if the base is among the
tensor's inputs and has it; else the mean of the rows of the models that have it; zeros if no model has it. Every
model then takes part in every row with its configured weight (mergekit does not drop a model's weight where it
lacks a token). `tokenizer.tokens` sets that row per token instead: another token's row of a model
(`{kind: model_token, model, token_id | token}`), that model's own row of the token (`source: MODEL`) or zeros
(`{kind: zero}`); with `force: true` every model takes it, even one that has the token. Configured tokens the output
lacks are added to it. Padding rows past the tokenizer's length get the mean of that model's real rows.

Known differences from mergekit 0.1.5, both in cases where its behaviour is not reproducible:
- `union` adds each model's new tokens in token-id order, models in config order. mergekit walks its models as a
  Python set (order varies with PYTHONHASHSEED) and each vocabulary in `get_vocab()` dict order.
- A token whose id is >= its model's `vocab_size` counts as missing from that model; mergekit raises a KeyError.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit import transformers_io
from moekit.config import TokenSetting
from moekit.errors import UserError, did_you_mean
from moekit.io.checkpoint import Checkpoint
from moekit.paths import expand_path


@dataclass(frozen=True)
class TokenRow:
    """A configured token's row (`tokenizer.tokens`): for the models that lack the token, or all with `force`."""

    token: str
    out_id: int
    force: bool
    model: int | None  # Plan.models index of the model whose row it is; None: zeros
    row: int  # that row, in the model's own token ids
    where: str


@dataclass
class Vocabulary:
    """The output vocabulary and, per input model, where each output token's row comes from."""

    tokenizer: Any  # transformers.PreTrainedTokenizerBase, saved as the output's tokenizer
    n_tokens: int
    size: int  # output rows: n_tokens rounded up to pad_to_multiple_of
    source_rows: list[torch.Tensor]  # per Plan.models index: int64 [n_tokens], the model's row or -1
    base: int | None  # Plan.models index of base_model
    token_rows: tuple[TokenRow, ...] = ()

    def permute(
        self, tensors: list[torch.Tensor], model_ids: list[int], hold_dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """`tensors` (rows indexed by each model's own token ids) re-laid with `size` rows in output order.

        `hold_dtype` is the dtype mergekit holds the inputs in (config `dtype`, else the stored one): the fallback
        means are accumulated in it, as mergekit does, so their rounding matches."""
        rows = [self.source_rows[m] for m in model_ids]
        present = torch.stack([r >= 0 for r in rows])  # [models, tokens]
        gathered = [t[r.clamp(min=0)] for t, r in zip(tensors, rows)]
        # Fallback rows, needed only where some model lacks the token: the mean of the present rows (which is
        # the donor's row when only one has it), replaced by the base's row where the base takes part and has it.
        acc = torch.zeros((self.n_tokens, *tensors[0].shape[1:]), dtype=hold_dtype)
        for g, p in zip(gathered, present):
            acc = torch.where(_rows(p, g), acc + g.to(hold_dtype), acc)
        count = present.sum(0).clamp(min=1).to(hold_dtype)
        fallback = (acc / count.view(-1, *[1] * (acc.dim() - 1))).to(tensors[0].dtype)
        if self.base in model_ids:
            i = model_ids.index(self.base)
            fallback = torch.where(_rows(present[i], fallback), gathered[i], fallback)
        configured = [(t, self._configured_row(t, tensors, model_ids)) for t in self.token_rows]
        out = []
        for g, p in zip(gathered, present):
            full = torch.where(_rows(p, g), g, fallback)
            for t, row in configured:
                if t.force or not p[t.out_id]:
                    full[t.out_id] = row
            if self.size > self.n_tokens:
                pad = full.to(hold_dtype).mean(0).to(full.dtype)
                full = torch.cat([full, pad.expand(self.size - self.n_tokens, *pad.shape)])
            out.append(full)
        return out

    def _configured_row(self, t: TokenRow, tensors: list[torch.Tensor], model_ids: list[int]) -> torch.Tensor:
        if t.model is None:
            return tensors[0].new_zeros(tensors[0].shape[1:])
        if t.model not in model_ids:
            raise UserError(
                f"{t.where}: its row comes from a model that is not an input of this vocabulary tensor; take the "
                "row from one of the merged models"
            )
        source = tensors[model_ids.index(t.model)]
        if t.row >= source.shape[0]:
            raise UserError(
                f"{t.where}: token id {t.row} is past the model's {source.shape[0]} embedding rows"
            )
        return source[t.row]

    def save(self, out_dir: Path) -> None:
        self.tokenizer.save_pretrained(str(out_dir))


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *[1] * (like.dim() - 1))


def _load_tokenizer(path: Path):
    return transformers_io.load_tokenizer(path, use_fast=True)


def _vocab_size(model: Checkpoint, tokenizer) -> int:
    n = model.config.get("vocab_size")
    return n if isinstance(n, int) and n > 0 else len(tokenizer.get_vocab())


def stripped_tokenizer(model: Checkpoint):
    """The model's tokenizer without the tokens whose id is >= its config's vocab_size (those have no row)."""
    tok = _load_tokenizer(model.path)
    limit = _vocab_size(model, tok)
    unused = {t for t, i in tok.get_vocab().items() if i >= limit}
    if not unused:
        return tok
    data = json.loads(tok.backend_tokenizer.to_str()) if tok.is_fast else None
    if data is None or data["model"]["type"] != "BPE":
        raise UserError(
            f"tokenizer of '{model.ref}' has tokens past vocab_size {limit} and is not a fast BPE tokenizer; "
            "it cannot be stripped for a tokenizer merge: use tokenizer_source: a model path"
        )
    from tokenizers import Tokenizer

    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < limit]
    for t in unused:
        data["model"]["vocab"].pop(t, None)
    data["model"]["merges"] = [
        m
        for m in data["model"]["merges"]
        if not any(p in unused for p in (m.split(" ") if isinstance(m, str) else m))
    ]
    tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tok


def _fresh_copy(tok):
    """A copy of `tok` that can be extended without touching it (save and reload, as tokenizers are stateful)."""
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return transformers_io.load_tokenizer(d, use_fast=True)


def union_tokenizer(base_tok, others: list[tuple[Checkpoint | None, Any]]):
    """The base tokenizer plus every token of `others` (model, tokenizer) it lacks, in mergekit's two passes."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for model, tok in others:
        limit = _vocab_size(model, tok) if model is not None else len(tok.get_vocab())
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < limit:
                plain.setdefault(t, None)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i < limit:
                added.setdefault(info.content, info)
    out = _fresh_copy(base_tok)
    base_vocab = base_tok.get_vocab()
    new_plain = [t for t in plain if t not in added and t not in base_vocab]
    if new_plain:
        out.add_tokens(new_plain)
    for info in added.values():
        if info.content not in out.get_vocab():
            out.add_tokens([info])
    return out


def build_vocabulary(
    source: str,
    models: list[Checkpoint],
    base: int | None,
    pad_to_multiple_of: int | None,
    where: str,
    base_dir: Path | None = None,
    tokens: tuple[TokenSetting, ...] = (),
) -> Vocabulary:
    """The output vocabulary for `tokenizer_source` = `source` and each model's row map into it; `tokens` (from
    tokenizer.tokens) are added when missing and take their rows as configured."""
    ref = base if base is not None else 0
    try:
        base_tok = stripped_tokenizer(models[ref])
    except (OSError, ValueError) as e:
        raise UserError(
            f"{where}: cannot load the tokenizer of '{models[ref].ref}' ({e}); tokenizer_source needs it"
        ) from None
    toks: list[Any] = []
    for i, m in enumerate(models):
        if i == ref:
            toks.append(base_tok)
            continue
        try:
            toks.append(_load_tokenizer(m.path))
        except (OSError, ValueError):
            toks.append(None)  # mergekit assumes such a model shares the base's tokenizer
    if source == "base":
        out_tok = base_tok
    elif source == "union":
        pairs = [(models[ref], base_tok)] + [
            (m, t) for i, (m, t) in enumerate(zip(models, toks)) if i != ref and t is not None
        ]
        out_tok = union_tokenizer(base_tok, pairs)
    else:
        match = next((m for m in models if m.ref == source), None)
        path = match.path if match else expand_path(source)
        if not path.is_absolute() and base_dir is not None:  # a path in a config is relative to the config
            path = base_dir / path
        if not path.is_dir():
            raise UserError(
                f"{where}: tokenizer_source '{source}' is not 'base', 'union' or a local model directory"
                f"{did_you_mean(source, ['base', 'union'])}"
            )
        try:
            out_tok = _load_tokenizer(path)
        except (OSError, ValueError) as e:
            raise UserError(
                f"{where}: tokenizer_source '{source}': cannot load a tokenizer there ({e})"
            ) from None
    missing = [t.token for t in tokens if t.token not in out_tok.get_vocab()]
    if missing:  # mergekit adds the configured tokens the output lacks, one by one, as plain tokens
        out_tok = _fresh_copy(out_tok)
        for t in missing:
            if t not in out_tok.get_vocab():
                out_tok.add_tokens(t)
    vocab = out_tok.get_vocab()
    n = len(vocab)
    size = n if not pad_to_multiple_of else -(-n // pad_to_multiple_of) * pad_to_multiple_of
    source_rows = []
    for m, tok in zip(models, toks):
        own = (tok or base_tok).get_vocab()
        limit = _vocab_size(m, tok or base_tok)
        rows = torch.full((n,), -1, dtype=torch.int64)
        for t, j in vocab.items():
            i = own.get(t)
            if i is not None and i < limit:
                rows[j] = i
        source_rows.append(rows)
    token_rows = tuple(
        _token_row(t, vocab[t.token], models, toks, base_tok, source_rows, base_dir) for t in tokens
    )
    return Vocabulary(out_tok, n, size, source_rows, base, tuple(r for r in token_rows if r is not None))


def _token_row(
    t: TokenSetting,
    out_id: int,
    models: list[Checkpoint],
    toks: list[Any],
    base_tok: Any,
    source_rows: list[torch.Tensor],
    base_dir: Path | None,
) -> TokenRow | None:
    """Where a configured token's row comes from, as mergekit's PermutedVocabulary takes it."""
    if t.kind == "zero":
        return TokenRow(t.token, out_id, t.force, None, 0, t.where)
    if (
        t.kind is None
    ):  # no source: only a token every model has, unforced, needs none (mergekit fails otherwise)
        if t.force or any(int(rows[out_id]) < 0 for rows in source_rows):
            raise UserError(
                f"{t.where}: needs a source (a model path, {{kind: model_token, model, token_id or token}} or "
                "{kind: zero}): some model lacks the token, or force is set"
            )
        return None
    i = _model_index(t.model, models, base_dir)
    if i is None:
        listing = ", ".join(f"'{m.ref}'" for m in models)
        raise UserError(f"{t.where}: source model '{t.model}' is not one of the merged models ({listing})")
    if t.kind == "model":
        row = int(source_rows[i][out_id])
        if row < 0:
            raise UserError(
                f"{t.where}: model '{models[i].ref}' has no token {t.token!r} to take its row from"
            )
        return TokenRow(t.token, out_id, t.force, i, row, t.where)
    if t.token_id is not None:
        if t.token_id < 0:
            raise UserError(f"{t.where}: token_id {t.token_id} is negative")
        return TokenRow(t.token, out_id, t.force, i, t.token_id, t.where)
    own = (toks[i] or base_tok).get_vocab()
    if t.source_token not in own:
        raise UserError(f"{t.where}: model '{models[i].ref}' has no token {t.source_token!r}")
    return TokenRow(t.token, out_id, t.force, i, own[t.source_token], t.where)


def _model_index(ref: str, models: list[Checkpoint], base_dir: Path | None) -> int | None:
    """The merged model a config reference names: by the reference itself, else by the directory it resolves to."""
    for i, m in enumerate(models):
        if m.ref == ref:
            return i
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    resolved = path.resolve() if path.exists() else None
    return next((i for i, m in enumerate(models) if resolved and m.path.resolve() == resolved), None)


# Chat templates by name (mergekit's names; the Jinja here is written for moekit from each format's published
# layout). A config's `chat_template:` is one of these, `auto`, or Jinja text.
BUILTIN_CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + "
        "'\\n\\n' }}{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + "
        "'\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] in ('user', 'system') %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "exaone": (
        "{% for message in messages %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def check_chat_template(setting: str, where: str) -> None:
    """`auto`, a built-in name, or Jinja text (mergekit's rule: at least 20 characters with a '{')."""
    if setting == "auto" or setting in BUILTIN_CHAT_TEMPLATES or (len(setting) >= 20 and "{" in setting):
        return
    names = ["auto", *BUILTIN_CHAT_TEMPLATES]
    raise UserError(
        f"{where}: chat_template {setting!r} is neither {', '.join(names)} nor Jinja text"
        f"{did_you_mean(setting, names)}"
    )


def resolve_chat_template(setting: str, model_dirs: list[Path]) -> str | None:
    """The template text: `auto` is the one most inputs carry (None when none has one), as mergekit."""
    if setting in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[setting]
    if setting != "auto":
        return setting
    found = []
    for d in model_dirs:
        try:
            template = _load_tokenizer(d).chat_template
        except (OSError, ValueError):
            continue
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    return Counter(found).most_common(1)[0][0] if found else None


def write_chat_template(out_dir: Path, template: str) -> bool:
    """Set the output tokenizer's chat template and save it where transformers reads it (save_pretrained).
    False when the output has no tokenizer to carry it."""
    try:
        tok = _load_tokenizer(out_dir)
    except (OSError, ValueError):
        return False
    tok.chat_template = template
    tok.save_pretrained(str(out_dir))
    return True
