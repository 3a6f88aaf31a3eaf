"""Fuzzing: random YAML structures and mutated valid configs through `moekit merge`, and random or mutated tensor
files through the readers. The only allowed outcomes are success (exit 0) or one line with exit 2 (a UserError);
any other exception is a bug and fails the test with hypothesis' minimal example.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
from hostile_models import micro_models, micro_tensors, run_cli_in_process, write_yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from moekit.config import DENSE_KEYS, MODEL_KEYS, SLICE_KEYS, SOURCE_KEYS
from moekit.errors import UserError
from moekit.io.checkpoint import open_tensors
from moekit.io.pickle_reader import PickleReader
from moekit.io.safetensors_reader import DTYPES, TensorReader, checkpoint_infos
from moekit.moe.config import EXPERT_KEYS, MOE_KEYS, UPCYCLE_KEYS

__all__ = ["micro_models"]

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PARAM_NAMES = [
    "weight",
    "density",
    "lambda",
    "t",
    "normalize",
    "epsilon",
    "gamma",
    "select_topk",
    "filter",
    "value",
]
WORDS = ["linear", "ties", "dare_ties", "slerp", "passthrough", "model_stock", "moe", "random", "uniform_random",
         "base", "float16", "bfloat16", "mixtral", "self_attn", "mlp", "hidden", "cheap_embed", "qwen"]  # fmt: skip
KEYS = sorted(
    {
        *DENSE_KEYS,
        *MOE_KEYS,
        *MODEL_KEYS,
        *SOURCE_KEYS,
        *SLICE_KEYS,
        *EXPERT_KEYS,
        *UPCYCLE_KEYS,
        *PARAM_NAMES,
    }
)


def _leaves(models: dict[str, Path]):
    return (
        st.none()
        | st.booleans()
        | st.integers(-3, 12)
        | st.floats(allow_nan=True, allow_infinity=True, width=32)
        | st.sampled_from(WORDS)
        | st.sampled_from([str(models[n]) for n in ("base", "ft1", "ft2", "wide", "qwen", "noweights")])
        | st.text(max_size=6)
    )


def _values(models):
    return st.recursive(
        _leaves(models),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
        max_leaves=14,
    )


def _valid_configs(m: dict[str, Path]) -> list[dict]:
    b, f1, f2 = (str(m[n]) for n in ("base", "ft1", "ft2"))
    return [
        {"merge_method": "linear", "models": [{"model": f1, "parameters": {"weight": 0.3}}, {"model": f2, "parameters": {"weight": 0.7}}]},
        {"merge_method": "ties", "base_model": b, "models": [{"model": f1, "parameters": {"weight": 1, "density": 0.5}},
                                                              {"model": f2, "parameters": {"weight": [0.2, 1], "density": 0.7}}],
         "parameters": {"lambda": 1.0}, "dtype": "float32"},
        {"merge_method": "slerp", "base_model": b, "models": [{"model": f1}],
         "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]}},
        {"merge_method": "passthrough", "slices": [{"sources": [{"model": f1, "layer_range": [0, 2]}]},
                                                   {"sources": [{"model": f2, "layer_range": [1, 2]}]}]},
        {"base_model": b, "gate_mode": "random", "experts_per_token": 2,
         "experts": [{"source_model": f1, "noise_scale": 0.01}, {"source_model": f2}]},
        {"merge_method": "moe", "base_model": b, "gate_mode": "uniform_random", "upcycle": {"num_experts": 3}},
    ]  # fmt: skip


def _paths(node, prefix=()):
    """Every (path, value) in a nested config, the root included."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _mutate(config: dict, data, models) -> dict:
    """1-3 random edits of a valid config: replace a value, drop a key, rename a key, or add one."""
    config = json.loads(json.dumps(config))
    for _ in range(data.draw(st.integers(1, 3))):
        spots = [(p, v) for p, v in _paths(config) if isinstance(v, dict | list) and v]
        if not spots:  # everything was dropped
            break
        path, node = data.draw(st.sampled_from(spots))
        key = data.draw(st.sampled_from(list(node) if isinstance(node, dict) else list(range(len(node)))))
        action = data.draw(st.sampled_from(["replace", "drop", "rename", "add"]))
        if action == "replace":
            node[key] = data.draw(_values(models))
        elif action == "drop":
            node.pop(key)
        elif isinstance(node, dict):
            new_key = data.draw(st.sampled_from(KEYS) | st.text(min_size=1, max_size=8))
            node[new_key] = node.pop(key) if action == "rename" else data.draw(_values(models))
    return config


def _assert_exit_0_or_one_line(config: dict | str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = (
            write_yaml(Path(tmp) / "fuzz.yaml", config)
            if isinstance(config, dict)
            else Path(tmp) / "fuzz.yaml"
        )
        if isinstance(config, str):
            path.write_text(config)
        out = Path(tmp) / "out"
        result = run_cli_in_process("merge", str(path), "-o", str(out), "--shard-size", "8KB", "-q")
        assert result.code in (0, 2), result
        event(f"exit {result.code}")
        if result.code == 2:
            assert len(result.lines) == 1 and result.lines[0].startswith("moekit: error: "), result.stderr
            assert not out.exists()
        else:
            assert (out / "config.json").is_file()
        assert [p.name for p in Path(tmp).iterdir()] in (
            ["fuzz.yaml"],
            ["fuzz.yaml", "out"],
            ["out", "fuzz.yaml"],
        )


@FUZZ
@given(data=st.data())
def test_random_yaml_structures(micro_models, data):
    values = _values(micro_models)
    config = data.draw(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), values, max_size=6))
    _assert_exit_0_or_one_line(config)


@FUZZ
@given(data=st.data())
def test_mutated_valid_configs(micro_models, data):
    base = data.draw(st.sampled_from(_valid_configs(micro_models)))
    _assert_exit_0_or_one_line(_mutate(base, data, micro_models))


@FUZZ
@given(data=st.data())
def test_mutated_yaml_text(micro_models, data):
    """Character edits of a valid config's YAML text: syntax errors, broken indentation, cut-off files."""
    text = write_yaml(
        Path(tempfile.mkdtemp()) / "v.yaml", data.draw(st.sampled_from(_valid_configs(micro_models)))
    )
    chars = list(text.read_text())
    shutil.rmtree(text.parent)
    for _ in range(data.draw(st.integers(1, 4))):
        if not chars:
            break
        i = data.draw(st.integers(0, len(chars) - 1))
        op = data.draw(st.sampled_from(["delete", "insert", "cut"]))
        if op == "delete":
            del chars[i]
        elif op == "insert":
            chars.insert(i, data.draw(st.sampled_from(list(":-[]{}'\"\t\n #&*!|>%@`,?"))))
        else:
            chars = chars[:i]
    _assert_exit_0_or_one_line("".join(chars))


def _read_everything(model_dir: Path, pickled: bool = False) -> None:
    """Open a checkpoint and read every tensor whole and by rows; only UserError may come out."""
    try:
        reader = (
            PickleReader({model_dir / "pytorch_model.bin": None})
            if pickled
            else TensorReader(checkpoint_infos(model_dir))
        )
        with reader:
            for name in reader.names():
                info = reader.infos[name]
                t = reader.read(name)
                assert tuple(t.shape) == info.shape and t.dtype == info.dtype
                if info.shape and info.shape[0] > 1:
                    assert reader.read(name, (1, info.shape[0])).shape[0] == info.shape[0] - 1
    except UserError as e:
        assert "\n" not in str(e)


def _valid_file() -> bytes:
    tensors = dict(list(micro_tensors(0, hidden=4, intermediate=8, layers=1, vocab=6).items())[:4])
    tensors["ints"] = torch.arange(6, dtype=torch.int16).reshape(2, 3)
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, f"{tmp}/m.safetensors")
        return Path(f"{tmp}/m.safetensors").read_bytes()


VALID_FILE = _valid_file()


@FUZZ
@given(raw=st.binary(max_size=300))
def test_random_bytes_as_safetensors(raw):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.safetensors").write_bytes(raw)
        _read_everything(Path(tmp))


@FUZZ
@given(data=st.data())
def test_mutated_safetensors_headers(data):
    n = int.from_bytes(VALID_FILE[:8], "little")
    header, body = json.loads(VALID_FILE[8 : 8 + n]), VALID_FILE[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry"]))
        if not isinstance(header[name], dict):  # replaced by a non-object earlier: nothing left to edit
            continue
        if field == "dtype":
            header[name]["dtype"] = data.draw(st.sampled_from([*DTYPES, "F17", "", 3, None]))
        elif field == "shape":
            header[name]["shape"] = data.draw(
                st.lists(st.integers(-2, 40), max_size=3) | st.sampled_from([None, "4", [2.0]])
            )
        elif field == "data_offsets":
            header[name]["data_offsets"] = data.draw(st.lists(st.integers(-10, 2 * len(body)), max_size=3))
        else:
            header[name] = data.draw(st.none() | st.integers() | st.just({}))
    raw_header = json.dumps(header).encode()
    length = len(raw_header) + data.draw(st.sampled_from([0, 0, 0, -1, 1, 7, -(2**20)]))
    blob = max(length, 0).to_bytes(8, "little") + raw_header + body
    blob = blob[: data.draw(st.integers(0, len(blob))) if data.draw(st.booleans()) else len(blob)]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.safetensors").write_bytes(blob)
        _read_everything(Path(tmp))


def _valid_pickle() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(micro_tensors(1, hidden=4, intermediate=8, layers=1, vocab=6), f"{tmp}/p.bin")
        return Path(f"{tmp}/p.bin").read_bytes()


VALID_PICKLE = _valid_pickle()


@FUZZ
@given(data=st.data())
def test_random_and_mutated_pickles(data):
    """--allow-pickle files: random bytes, or a real torch.save file with bytes flipped or cut."""
    if data.draw(st.booleans()):
        blob = data.draw(st.binary(max_size=300))
    else:
        blob = bytearray(VALID_PICKLE)
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(blob[: data.draw(st.integers(math.ceil(len(blob) / 2), len(blob)))])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "pytorch_model.bin").write_bytes(blob)
        _read_everything(Path(tmp), pickled=True)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=12)
    | st.sampled_from(["model.safetensors", "a.bin"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(index=JSON | st.fixed_dictionaries({"weight_map": JSON | st.dictionaries(st.text(max_size=8), JSON)}))
def test_random_index_files(index):
    """A sharded checkpoint whose index JSON is random: the safetensors reader, and the pickle path when allowed."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "shard.safetensors").write_bytes(VALID_FILE)
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        _read_everything(d)
        try:
            open_tensors(d, allow_pickle=True).close()
        except UserError as e:
            assert "\n" not in str(e)
