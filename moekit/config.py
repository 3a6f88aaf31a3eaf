"""Merge configs: YAML loading, mergekit-compatible schema, validation with suggestions.

mergekit ignores keys it does not know and parameters the method does not take, so a typo like `densty:` merges
silently with the default. Here every key is checked against the schema, with a "did you mean" for near misses;
the method's parameters are checked against its declaration by the registry (merging/registry.py), with the
value readers below.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from moekit.errors import UserError, did_you_mean

if TYPE_CHECKING:
    import torch

    from moekit.merging.registry import Param  # what the value readers read by; nothing of it is imported

log = logging.getLogger(__name__)

# The dtype spellings a config may use, each the name of a torch dtype. Kept as names so that a config can be
# read and checked before anything imports torch (a user error then takes a fraction of a second).
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
}
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max

DENSE_KEYS = {
    "merge_method": "the method, e.g. linear, ties, slerp",
    "base_model": "path of the base model",
    "models": "list of {model, parameters}",
    "slices": "list of {sources: [{model, layer_range, parameters}], parameters}",
    "modules": "per-module models/slices (mergekit's multi-module form; a causal LM has one, 'default')",
    "parameters": "global method parameters",
    "dtype": "dtype the inputs are cast to",
    "out_dtype": "dtype of the output tensors",
    "compute_dtype": "dtype of the arithmetic (moekit; default float32; `mergekit` = mergekit's, bit for bit)",
    "tokenizer_source": "base, union, or a model path",
    "tokenizer": "{source, tokens, pad_to_multiple_of}",
    "chat_template": "chat template name or Jinja text for the output tokenizer",
    "out": "output directory (moekit)",
    "name": "a name for the model card (moekit)",
}
MODEL_KEYS = {"model", "parameters"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
SLICE_KEYS = {"sources", "parameters", "base_model"}
TOKENIZER_KEYS = {"source", "pad_to_multiple_of", "tokens"}
MODULE_KEYS = {"models", "slices", "parameters"}
# mergekit's name for the one module of a model whose layers form one stack (every architecture moekit merges)
SINGLE_MODULE = "default"


@dataclass
class Source:
    """One input to a slice: a model and (for slices) a layer range, with its per-model parameters."""

    model: str
    layer_range: tuple[int, int] | None
    parameters: dict[str, Any]
    where: str


@dataclass
class Slice:
    sources: list[Source]
    parameters: dict[str, Any]
    base_model: str | None
    where: str


@dataclass
class MergeConfig:
    """A dense-merge config, checked as far as it can be without knowing the method (the registry checks the
    parameters). `models` configs become one slice over every layer at plan time."""

    merge_method: str
    base_model: str | None
    models: list[Source] | None
    slices: list[Slice] | None
    parameters: dict[str, Any]
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    compute_dtype: (
        torch.dtype | None
    )  # None: `compute_dtype: mergekit`, the dtype mergekit holds the inputs in
    tokenizer_source: str | None
    pad_to_multiple_of: int | None
    chat_template: str | None
    out: str | None
    name: str | None
    raw: dict
    path: Path | None
    base_dir: Path | None = field(default=None)
    # mergekit's output switches (--no-copy-tokenizer, --no-write-model-card): options of the run, not YAML keys
    copy_tokenizer: bool = True
    write_model_card: bool = True
    unsafe_truncate_embeddings: bool = False
    tokens: tuple[TokenSetting, ...] = ()  # tokenizer.tokens, in config order
    # `modules:` configs: the module names, in config order; the first one's models/slices are the ones above,
    # and its parameters rank between a slice's and the global ones (mergekit's precedence)
    modules: tuple[str, ...] = ()
    module_parameters: dict[str, Any] = field(default_factory=dict)


class _NoDuplicateKeysLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one silently, so a
    `weight:` written twice would merge with whichever came last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in the same mapping", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def read_yaml(source: str | Path | dict) -> tuple[dict, Path | None]:
    """The config as a dict, and the file it came from. YAML errors name the line and column."""
    docs, path = read_yaml_documents(source)
    if len(docs) > 1:
        raise UserError(
            f"{path or '<config>'}: several YAML documents (a mergekit-multi config) are merged by `moekit merge`, "
            "not here; pass one document"
        )
    return docs[0], path


def read_yaml_documents(source: str | Path | dict) -> tuple[list[dict], Path | None]:
    """Every YAML document of the config (one for a plain config; several for a mergekit-multi one), and the
    file it came from. YAML errors name the line and column."""
    if isinstance(source, dict):
        check_config_size(source, "<config>")
        return [source], None
    path = Path(source)
    text = None
    if isinstance(source, Path) or ("\n" not in str(source) and len(str(source)) < 4096):
        if not path.exists():
            if isinstance(source, str) and ":" in source and not source.endswith((".yaml", ".yml")):
                text, path = source, None
            else:
                raise UserError(f"config file '{source}' does not exist")
        elif path.is_dir():
            raise UserError(f"config '{source}' is a directory; pass the YAML file")
        else:
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"config '{source}': cannot read ({e})") from None
    else:
        text, path = str(source), None
    name = str(path) if path else "<config>"
    try:
        docs = [d for d in yaml.load_all(text, Loader=_NoDuplicateKeysLoader) if d is not None]  # noqa: S506
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise UserError(f"{name}{at}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise UserError(f"{name}: the YAML is nested too deeply to be a merge config") from None
    if not docs:
        raise UserError(f"{name}: the config is empty")
    for i, raw in enumerate(docs):
        doc = f"{name}" if len(docs) == 1 else f"{name}: document {i + 1}"
        if not isinstance(raw, dict):
            raise UserError(
                f"{doc}: the config must be a YAML mapping (key: value), not {type(raw).__name__}"
            )
        check_config_size(raw, doc)
    return docs, path


MAX_CONFIG_VALUES = 100_000  # a real config holds hundreds; YAML aliases can make billions out of a few lines


def check_config_size(raw: dict, name: str) -> None:
    """Refuse a config whose values, with YAML aliases expanded, number more than MAX_CONFIG_VALUES (a "billion
    laughs" config, or one that contains itself): every later check walks or prints values and would never end."""
    count, stack = 0, [raw]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise UserError(
                f"{name}: the config expands to more than {MAX_CONFIG_VALUES} values (YAML aliases that repeat or "
                "contain themselves); write it out plainly"
            )
        if isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)


def is_moe_config(raw: dict) -> bool:
    return raw.get("merge_method") == "moe" or (
        ("experts" in raw or "upcycle" in raw) and "merge_method" not in raw
    )


@dataclass(frozen=True)
class TokenSetting:
    """One entry of `tokenizer.tokens` (mergekit's TokenEmbeddingConfig): where the token's embedding row comes
    from where a model lacks the token, or for every model with `force`."""

    token: str
    force: bool
    kind: str | None  # "model" (that model's row of this token), "model_token", "zero", or None (no source)
    model: str | None = None
    token_id: int | None = None  # model_token: a row of `model` by id...
    source_token: str | None = None  # ...or by that model's token
    where: str = ""


TOKEN_KEYS = {"source", "force"}
TOKEN_SOURCE_KEYS = {"kind", "model", "token_id", "token"}


def parse_token_settings(raw: object, where: str) -> tuple[TokenSetting, ...]:
    """`tokenizer.tokens` as mergekit's pydantic models accept it."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping of token -> {{source, force}}, got {_short(raw)}")
    out = []
    for token, entry in raw.items():
        at = f"{where}.{token}"
        if not isinstance(token, str):
            raise UserError(f"{where}: token {_short(token)} must be a string (quote it)")
        entry = check_keys({} if entry is None else entry, TOKEN_KEYS, at)
        force = _coerced(bool, entry.get("force", False))
        if force is None:
            raise UserError(f"{at}.force: expected true or false, got {_short(entry.get('force'))}")
        src = entry.get("source")
        if src is None:
            out.append(TokenSetting(token, force, None, where=at))
        elif isinstance(src, str):
            out.append(TokenSetting(token, force, "model", src, where=at))
        elif isinstance(src, dict):
            src = check_keys(src, TOKEN_SOURCE_KEYS, f"{at}.source")
            kind = src.get("kind")
            if kind == "zero" and set(src) == {"kind"}:
                out.append(TokenSetting(token, force, "zero", where=at))
                continue
            if kind != "model_token":
                raise UserError(
                    f"{at}.source: kind must be 'model_token' (with model and token_id or token) or 'zero' "
                    f"(alone), got {_short(kind)}{did_you_mean(str(kind), ['model_token', 'zero'])}"
                )
            model, token_id, source_token = src.get("model"), src.get("token_id"), src.get("token")
            if not isinstance(model, str):
                raise UserError(f"{at}.source.model: expected a model path, got {_short(model)}")
            if (token_id is None) == (source_token is None):
                raise UserError(f"{at}.source: give exactly one of token_id and token")
            if token_id is not None and (_coerced(int, token_id) is None or isinstance(token_id, bool)):
                raise UserError(f"{at}.source.token_id: expected an integer, got {_short(token_id)}")
            if source_token is not None and not isinstance(source_token, str):
                raise UserError(f"{at}.source.token: expected a string, got {_short(source_token)}")
            tid = None if token_id is None else _coerced(int, token_id)
            out.append(TokenSetting(token, force, "model_token", model, tid, source_token, at))
        else:
            raise UserError(f"{at}.source: expected a model path or a mapping with 'kind', got {_short(src)}")
    return tuple(out)


def check_keys(obj: object, allowed, where: str) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a mapping, got {type(obj).__name__} {_short(obj)}")
    for key in obj:
        if key not in allowed:
            raise UserError(
                f"{where}: unknown key '{key}'{did_you_mean(key, allowed)}; allowed: {', '.join(sorted(allowed))}"
            )
    return obj


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def parse_dtype(value: object, where: str) -> torch.dtype | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in DTYPES:
        raise UserError(
            f"{where}: unknown dtype {value!r}{did_you_mean(str(value), DTYPES)}; use float32, float16 or bfloat16"
        )
    return torch_dtype(value)


def torch_dtype(spelling: str) -> torch.dtype:
    """The torch dtype a config's dtype spelling (a key of DTYPES) names."""
    import torch

    return getattr(torch, DTYPES[spelling])


MERGEKIT_ARITHMETIC = "mergekit"


def parse_compute_dtype(value: object, where: str) -> torch.dtype | None:
    """A dtype, or None for `mergekit`: inputs held in the dtype mergekit holds them in (`dtype`, else as stored)
    and every method's arithmetic done at mergekit's precision and in its order, so the output is mergekit's
    bit for bit (on bf16 and fp16 inputs too)."""
    if value == MERGEKIT_ARITHMETIC:
        return None
    if value is None:
        raise UserError(f"{where}: give a dtype (float32, bfloat16, float16) or mergekit")
    return parse_dtype(value, where)


def parse_merge_config(raw: dict, path: Path | None = None) -> MergeConfig:
    """Validate a dense-merge config; everything that can be checked without the model files is checked here."""
    name = str(path) if path else "<config>"
    check_keys(raw, DENSE_KEYS, name)
    if "merge_method" not in raw:
        raise UserError(f"{name}: missing 'merge_method' (e.g. merge_method: linear)")
    if not isinstance(raw["merge_method"], str):
        raise UserError(f"{name}: merge_method must be a method's name, got {_short(raw['merge_method'])}")
    if sum(raw.get(k) is not None for k in ("models", "slices", "modules")) != 1:
        raise UserError(f"{name}: give exactly one of 'models', 'slices' or 'modules'")

    base_model = _model_ref(raw.get("base_model"), f"{name}: base_model", optional=True)
    modules: dict[str, tuple[list[Source] | None, list[Slice] | None, dict[str, Any]]] = {}
    if raw.get("modules") is not None:
        if not isinstance(raw["modules"], dict) or not raw["modules"]:
            raise UserError(
                f"{name}: modules: expected a mapping of module name -> {{models | slices, parameters}}, got "
                f"{_short(raw['modules'])}"
            )
        for module, body in raw["modules"].items():
            where = f"{name}: modules.{module}"
            check_keys(body, MODULE_KEYS, where)
            modules[str(module)] = (
                *_models_or_slices(body, name, str(module)),
                _params(body.get("parameters"), f"{where}.parameters"),
            )
        models, slices, module_parameters = next(iter(modules.values()))
    else:
        models, slices = _models_or_slices(raw, name, None)
        module_parameters = {}

    parameters = _params(raw.get("parameters"), f"{name}: parameters")
    cfg_tokenizer = raw.get("tokenizer")
    tokenizer_source = raw.get("tokenizer_source")
    pad_to = None
    tokens: tuple[TokenSetting, ...] = ()
    if cfg_tokenizer is not None:
        check_keys(cfg_tokenizer, TOKENIZER_KEYS, f"{name}: tokenizer")
        if tokenizer_source is not None:
            raise UserError(f"{name}: give either 'tokenizer_source' or 'tokenizer', not both")
        tokens = parse_token_settings(cfg_tokenizer.get("tokens"), f"{name}: tokenizer.tokens")
        tokenizer_source = cfg_tokenizer.get("source", "union")  # mergekit's TokenizerConfig default
        pad_to = cfg_tokenizer.get("pad_to_multiple_of")
        if pad_to is not None and (not isinstance(pad_to, int) or isinstance(pad_to, bool) or pad_to < 1):
            raise UserError(
                f"{name}: tokenizer.pad_to_multiple_of must be a positive integer, got {_short(pad_to)}"
            )
    if tokenizer_source is not None and not isinstance(tokenizer_source, str):
        raise UserError(
            f"{name}: tokenizer_source must be 'base', 'union' or a model path, got {_short(tokenizer_source)}"
        )
    if tokenizer_source == "base" and base_model is None:
        raise UserError(f"{name}: tokenizer_source: base needs a base_model")
    for key in ("chat_template", "out", "name"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise UserError(f"{name}: '{key}' must be a string, got {_short(raw[key])}")
    if raw.get("chat_template") is not None:
        from moekit.merging.tokenizer import check_chat_template

        check_chat_template(raw["chat_template"], f"{name}: chat_template")

    return MergeConfig(
        merge_method=raw["merge_method"],
        base_model=base_model,
        models=models,
        slices=slices,
        parameters=parameters,
        dtype=parse_dtype(raw.get("dtype"), f"{name}: dtype"),
        out_dtype=parse_dtype(raw.get("out_dtype"), f"{name}: out_dtype"),
        compute_dtype=parse_compute_dtype(raw.get("compute_dtype", "float32"), f"{name}: compute_dtype"),
        tokenizer_source=tokenizer_source,
        pad_to_multiple_of=pad_to,
        tokens=tokens,
        chat_template=raw.get("chat_template"),
        out=raw.get("out"),
        name=raw.get("name"),
        raw=raw,
        path=path,
        base_dir=path.parent if path else None,
        modules=tuple(modules),
        module_parameters=module_parameters,
    )


def check_modules(config: MergeConfig, architecture: str) -> None:
    """A `modules:` config names the modules of its model as mergekit does: a model whose layers form one stack
    (every architecture moekit merges) has one, 'default'; several are for vision-language and encoder-decoder
    models, which moekit does not merge."""
    if not config.modules:
        return
    name = str(config.path) if config.path else "<config>"
    if len(config.modules) > 1:
        raise UserError(
            f"{name}: modules: {', '.join(config.modules)}: a config with several modules is for a model with "
            f"several (vision-language, encoder-decoder), which moekit does not merge; {architecture} has one, "
            f"'{SINGLE_MODULE}': keep only that module"
        )
    if config.modules[0] != SINGLE_MODULE:
        raise UserError(
            f"{name}: modules.{config.modules[0]}: {architecture} has one module, which mergekit names "
            f"'{SINGLE_MODULE}'; rename it (modules: {{{SINGLE_MODULE}: ...}}) or write its models:/slices: at the "
            "top level"
        )


def _models_or_slices(
    raw: dict, name: str, module: str | None
) -> tuple[list[Source] | None, list[Slice] | None]:
    """The `models:` or the `slices:` of a config, or of its module `module`, exactly one of them given."""
    at = f"{name}: modules.{module}." if module is not None else f"{name}: "
    if (raw.get("models") is None) == (raw.get("slices") is None):
        raise UserError(f"{at.rstrip(' .')}: give exactly one of 'models' or 'slices'")
    if raw.get("models") is not None:
        listed = _list(raw["models"], f"{at}models")
        return [_parse_model(m, f"{at}models[{i}]") for i, m in enumerate(listed)], None
    listed = _list(raw["slices"], f"{at}slices")
    return None, [_parse_slice(s, f"{at}slices[{i}]") for i, s in enumerate(listed)]


def _list(value: object, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: expected a non-empty list, got {_short(value)}")
    return value


def _model_ref(value: object, where: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: expected a model path (a string), got {_short(value)}")
    return value


def _params(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping of parameter: value, got {_short(value)}")
    return dict(value)


def _parse_model(entry: object, where: str) -> Source:
    if isinstance(entry, str):  # mergekit accepts a bare path in `models`
        return Source(entry, None, {}, where)
    check_keys(entry, MODEL_KEYS, where)
    return Source(
        _model_ref(entry.get("model"), f"{where}.model"),
        None,
        _params(entry.get("parameters"), f"{where}.parameters"),
        where,
    )


def _parse_slice(entry: object, where: str) -> Slice:
    check_keys(entry, SLICE_KEYS, where)
    sources = []
    for j, src in enumerate(_list(entry.get("sources"), f"{where}.sources")):
        swhere = f"{where}.sources[{j}]"
        check_keys(src, SOURCE_KEYS, swhere)
        lr = src.get("layer_range")
        if (
            not isinstance(lr, list | tuple)
            or len(lr) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
        ):
            raise UserError(f"{swhere}.layer_range: expected [start, end] integers, got {_short(lr)}")
        if not 0 <= lr[0] < lr[1]:
            raise UserError(f"{swhere}.layer_range: {list(lr)} must satisfy 0 <= start < end")
        model = _model_ref(src.get("model"), f"{swhere}.model")
        sources.append(
            Source(model, (lr[0], lr[1]), _params(src.get("parameters"), f"{swhere}.parameters"), swhere)
        )
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
    if len(lengths) > 1:
        raise UserError(
            f"{where}: all sources of a slice must span the same number of layers, got {sorted(lengths)}"
        )
    base = _model_ref(entry.get("base_model"), f"{where}.base_model", optional=True)
    return Slice(sources, _params(entry.get("parameters"), f"{where}.parameters"), base, where)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def coerce_setting(p: Param, setting: object, where: str) -> Any:
    """The setting with every scalar read as p's type (see coerce_value), in the same shape."""
    if isinstance(setting, bool | int | float | str):
        return coerce_value(p, setting, where)
    if isinstance(setting, dict):
        check_keys(setting, {"filter", "value"}, where)
        if "value" not in setting:
            raise UserError(f"{where}: a conditional parameter needs a 'value'")
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise UserError(f"{where}.filter: must be a string (a substring of tensor names)")
        return {**setting, "value": coerce_setting(p, setting["value"], f"{where}.value")}
    if isinstance(setting, list):
        if not setting:
            raise UserError(f"{where}: an empty list is not a gradient; give a value or a list of values")
        if all(isinstance(v, bool | int | float | str) for v in setting):
            return [coerce_value(p, v, where) for v in setting]
        if all(isinstance(v, dict) for v in setting):
            return [coerce_setting(p, v, f"{where}[{i}]") for i, v in enumerate(setting)]
        raise UserError(
            f"{where}: mix of values and conditions; use a list of numbers or a list of {{filter, value}}"
        )
    raise UserError(
        f"{where}: expected a number, a list of numbers, or {{filter, value}} conditions, got {_short(setting)}"
    )


def fits_float32(value: int | float) -> bool:
    """A finite number float32 can hold: merges compute in float32, where a bigger one is Inf (or an error)."""
    try:
        return math.isfinite(float(value)) and abs(float(value)) <= FLOAT32_MAX
    except OverflowError:  # an int with hundreds of digits
        return False


BOOL_WORDS = {"1": True, "on": True, "t": True, "true": True, "y": True, "yes": True}
BOOL_WORDS |= {"0": False, "off": False, "f": False, "false": False, "n": False, "no": False}


def coerce_value(p: Param, value: bool | int | float | str, where: str) -> Any:
    """One value as mergekit's pydantic validation reads it for p's type, then range-checked. YAML 1.1 reads
    `1e-5` (no dot) as a string; a float parameter takes it as the number, as mergekit does."""
    got = _coerced(p.kind, value)
    if got is None:
        raise UserError(f"{where}: expected {p.kind.__name__}, got {_short(value)}")
    if p.kind is float and not fits_float32(got):
        raise UserError(f"{where}: {_short(value)} is not a finite number within float32's range (±3.4e38)")
    if p.check is not None and (problem := p.check(got)):
        raise UserError(f"{where}: {value!r} {problem}")
    return got


def _coerced(kind: type, value: bool | int | float | str) -> Any:
    if kind is str:
        return value if isinstance(value, str) else None
    if kind is bool:
        if isinstance(value, str):
            return BOOL_WORDS.get(value.strip().lower())
        return bool(value) if value in (0, 1) else None
    if isinstance(value, str):
        try:
            number = float(value.strip()) if kind is float else int(value.strip())
        except ValueError:
            return None
        return number
    if kind is int:
        return int(value) if isinstance(value, int) else int(value) if value.is_integer() else None
    try:
        return float(value)
    except OverflowError:  # an int with hundreds of digits: refused as out of float32's range
        return math.inf


def warn_unused_gradient_values(params: dict[str, Any], spans: list[int], where: str) -> None:
    """mergekit spreads a gradient's values over each slice's layers (t = i / (layers - 1), and t = 0 for the
    tensors outside the layers), interpolating between neighbours: a list longer than the layers still shapes
    every layer. Only a value that no position reaches has no effect; that is worth a warning."""
    for key, setting in params.items():
        for at, values in _value_lists(setting, f"{where}.{key}"):
            numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
            unused = set(range(len(values))) - used_gradient_values(len(values), spans, numeric)
            if unused:
                log.warning(
                    "%s: values %s of this %d-value gradient reach no layer (over %s layer(s)) and have no effect",
                    at,
                    [values[i] for i in sorted(unused)],
                    len(values),
                    "/".join(map(str, sorted(set(spans)))),
                )


def used_gradient_values(count: int, spans: list[int], numeric: bool) -> set[int]:
    """Indices of a `count`-value gradient that take part at some position of slices with these spans."""
    used = set()
    positions = {0.0} | {i / (n - 1) if n > 1 else 1.0 for n in spans for i in range(max(n, 1))}
    for t in positions:
        scaled = t * (count - 1)
        i0 = int(scaled)
        if not numeric:
            used.add(i0)
            continue
        used.add(i0)
        if scaled - i0 > 0:
            used.add(min(count - 1, i0 + 1))
    return used


def _value_lists(setting: object, where: str) -> list[tuple[str, list]]:
    """Every list of values in a setting (a gradient, or a condition's gradient), with where it is."""
    if isinstance(setting, dict):
        return _value_lists(setting.get("value"), f"{where}.value")
    if isinstance(setting, list) and setting and all(isinstance(v, dict) for v in setting):
        return [found for i, c in enumerate(setting) for found in _value_lists(c, f"{where}[{i}]")]
    return [(where, setting)] if isinstance(setting, list) else []


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """mergekit's rule: scalars as is; numeric lists interpolated over t in [0, 1]; conditions by substring, first wins."""
    if isinstance(setting, bool | int | float | str):
        return setting
    if isinstance(setting, dict):
        setting = [setting]
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    if all(not isinstance(v, dict) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or flt in tensor_name:
            return evaluate_setting(cond["value"], tensor_name, t)
    return None
