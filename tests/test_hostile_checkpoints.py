"""Broken checkpoints: truncated files, lying headers, escaping indexes, configs that disagree with the tensors,
pickled weights, NaN/Inf. Each bad input is answered with one line and exit 2 and nothing on disk; pickled weights
load only with --allow-pickle, and then through torch.load(weights_only=True).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_tensors
from hostile_models import (
    Case,
    assert_failed_cleanly,
    linear_config,
    micro_models,
    run_case,
    run_cli_in_process,
    write_yaml,
)
from safetensors.torch import load_file, save_file

import moekit

__all__ = ["CHECKPOINT_CASES", "micro_models"]

TOL = 1e-6  # fp32 linear merge against the formula, as in test_merge_basic
LIED = "model.layers.0.mlp.down_proj.weight"


def broken(edit):
    """A copy of ft2 as `<case dir>/bad`, changed by `edit(bad_dir)`, merged linearly with ft1."""

    def build(m, d):
        bad = shutil.copytree(m["ft2"], d / "bad")
        edit(bad)
        return linear_config(m["ft1"], bad)

    return build


def split_header(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_header(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + data


def edit_header(fn):
    def edit(bad: Path):
        f = bad / "model.safetensors"
        header, data = split_header(f.read_bytes())
        fn(header)
        f.write_bytes(join_header(header, data))

    return edit


def set_entry(name: str, **changes):
    return edit_header(lambda h: h[name].update(changes))


def overlap(h: dict) -> None:
    h["model.layers.0.mlp.up_proj.weight"]["data_offsets"] = h["model.layers.0.mlp.gate_proj.weight"][
        "data_offsets"
    ]


def truncate(keep: int | None = None, fraction: float = 0.5):
    def edit(bad: Path):
        f = bad / "model.safetensors"
        raw = f.read_bytes()
        f.write_bytes(raw[: keep if keep is not None else int(len(raw) * fraction)])

    return edit


def write_raw_header_length(n: int):
    def edit(bad: Path):
        f = bad / "model.safetensors"
        f.write_bytes(n.to_bytes(8, "little") + f.read_bytes()[8:])

    return edit


def shard(index_edit=None, link: tuple[str, Path] | None = None):
    """ft2 split in two shards with an index; `index_edit(weight_map)` then corrupts the index."""

    def edit(bad: Path):
        tensors = load_file(str(bad / "model.safetensors"))
        (bad / "model.safetensors").unlink()
        names = sorted(tensors)
        files = {
            "model-00001-of-00002.safetensors": names[:10],
            "model-00002-of-00002.safetensors": names[10:],
        }
        weight_map = {}
        for file, part in files.items():
            save_file({n: tensors[n] for n in part}, str(bad / file), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, file)
        if index_edit is not None:
            index_edit(weight_map, bad)
        (bad / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )

    return edit


def remap(tensor: str, target: str):
    return shard(lambda wm, bad: wm.__setitem__(tensor, target))


def symlinked_shard(outside: Path):
    def edit(wm, bad):
        (bad / "evil.safetensors").symlink_to(outside)
        wm[LIED] = "evil.safetensors"

    return shard(edit)


def symlinked_single(m, d):
    bad = shutil.copytree(m["ft2"], d / "bad")
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors").symlink_to(m["ft3"] / "model.safetensors")
    return linear_config(m["ft1"], bad)


def unreadable_index(bad: Path) -> None:
    shard()(bad)
    (bad / "model.safetensors.index.json").write_text("{")


def layer_gap(m, d):
    """A 4-layer model whose layer 2 tensors are gone (config.json still says 4)."""
    bad = shutil.copytree(m["deep"], d / "bad")
    drop_layer(2)(bad)
    return linear_config(m["deep"], bad)


def edit_config(**changes):
    def edit(bad: Path):
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps(cfg | changes))

    return edit


def edit_tensors(fn):
    def edit(bad: Path):
        t = load_file(str(bad / "model.safetensors"))
        fn(t)
        save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})

    return edit


def poison(value: float, name: str = LIED, index: tuple[int, int] = (3, 5)):
    return edit_tensors(lambda t: t[name].__setitem__(index, value))


def drop_layer(layer: int):
    return edit_tensors(lambda t: [t.pop(n) for n in list(t) if n.startswith(f"model.layers.{layer}.")])


def to_pickle(bad: Path) -> None:
    tensors = load_file(str(bad / "model.safetensors"))
    (bad / "model.safetensors").unlink()
    torch.save(tensors, bad / "pytorch_model.bin")


def pickle_shards(index_name: str):
    """ft2 as two torch.save shards with an index named `index_name`."""

    def edit(bad: Path):
        tensors = load_file(str(bad / "model.safetensors"))
        (bad / "model.safetensors").unlink()
        names = sorted(tensors)
        weight_map = {}
        for i, part in enumerate((names[:10], names[10:])):
            file = f"pytorch_model-0000{i + 1}-of-00002.bin"
            torch.save({n: tensors[n] for n in part}, bad / file)
            weight_map |= dict.fromkeys(part, file)
        (bad / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    return edit


class Payload:
    """Unpickling this object opens (creates) a file: a stand-in for any code a hostile pickle would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (io.open, (self.marker, "w"))


def hostile_pickle(bad: Path) -> None:
    tensors = load_file(str(bad / "model.safetensors"))
    (bad / "model.safetensors").unlink()
    torch.save(tensors | {"lm_head.weight": Payload(bad / "PWNED")}, bad / "pytorch_model.bin")


def garbage_pickle(bad: Path) -> None:
    (bad / "model.safetensors").unlink()
    noise = torch.randint(0, 256, (300,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (bad / "pytorch_model.bin").write_bytes(noise.numpy().tobytes())  # seeded: the README quotes its message


def list_pickle(bad: Path) -> None:
    tensors = load_file(str(bad / "model.safetensors"))
    (bad / "model.safetensors").unlink()
    torch.save(list(tensors.values()), bad / "pytorch_model.bin")


BAD = "{dir}/bad"
SHARD2 = "model-00002-of-00002.safetensors"
PICKLE = ("--allow-pickle",)

CHECKPOINT_CASES: list[Case] = [
    # --- truncated files and lying headers ---
    Case(
        "truncated-half", "a safetensors file cut in half", broken(truncate()), (BAD, "the file is truncated")
    ),
    Case(
        "truncated-to-5-bytes",
        "a safetensors file of 5 bytes",
        broken(truncate(keep=5)),
        (BAD, "not a safetensors file"),
    ),
    Case(
        "header-length-lies",
        "a header length larger than the file",
        broken(write_raw_header_length(2**40)),
        (BAD, "header length 1099511627776 does not fit"),
    ),
    Case(
        "header-not-json", "a header that is not JSON", broken(write_raw_header_length(7)), (BAD, "not JSON")
    ),
    Case(
        "header-lies-dtype",
        "a header that says F16 for F32 data",
        broken(set_entry(LIED, dtype="F16")),
        (BAD, LIED, "header says F16", "lies about dtype, shape or offsets"),
    ),
    Case(
        "header-lies-shape",
        "a header whose shape does not match the bytes",
        broken(set_entry(LIED, shape=[16, 33])),
        (BAD, LIED, "header says F32 [16, 33]"),
    ),
    Case(
        "header-offsets-past-end",
        "data_offsets past the end of the file",
        broken(set_entry(LIED, data_offsets=[10**9, 10**9 + 2048])),
        (BAD, LIED, "truncated"),
    ),
    Case(
        "header-offsets-reversed",
        "data_offsets in the wrong order",
        broken(set_entry(LIED, data_offsets=[2048, 0])),
        (BAD, LIED, "not ordered"),
    ),
    Case(
        "header-overlap", "two tensors sharing the same bytes", broken(edit_header(overlap)), (BAD, "overlap")
    ),
    Case(
        "header-unknown-dtype",
        "an unknown dtype",
        broken(set_entry(LIED, dtype="F17")),
        (BAD, "unknown dtype 'F17'"),
    ),
    Case(
        "header-negative-shape",
        "a negative dimension",
        broken(set_entry(LIED, shape=[-16, -32])),
        (BAD, "bad shape"),
    ),
    # --- indexes that point at missing files or outside the model ---
    Case(
        "index-missing-shard",
        "an index naming a shard that is not there",
        broken(remap(LIED, "model-00003-of-00003.safetensors")),
        ("model-00003-of-00003.safetensors", "is missing"),
    ),
    Case(
        "index-dotdot",
        "an index shard name ../../etc/passwd",
        broken(remap(LIED, "../../etc/passwd")),
        ("'../../etc/passwd' points outside the model directory",),
    ),
    Case(
        "index-absolute",
        "an index shard name /etc/passwd",
        broken(remap(LIED, "/etc/passwd")),
        ("'/etc/passwd' is an absolute path",),
    ),
    Case(
        "index-symlink",
        "an index shard that is a symlink leaving the directory",
        lambda m, d: broken(symlinked_shard(m["ft3"] / "model.safetensors"))(m, d),
        ("'evil.safetensors' points outside the model directory",),
    ),
    Case(
        "single-file-symlink",
        "model.safetensors as a symlink leaving the directory",
        symlinked_single,
        ("'model.safetensors' points outside the model directory",),
    ),
    Case(
        "index-wrong-shard",
        "an index that maps a tensor to a shard without it",
        broken(remap("lm_head.weight", SHARD2)),
        ("'lm_head.weight' is mapped to", "does not hold it"),
    ),
    Case(
        "index-shard-not-a-name",
        "an index that maps a tensor to a list instead of a file name",
        broken(shard(lambda wm, bad: wm.__setitem__(LIED, ["model-00001-of-00002.safetensors"]))),
        (f"tensor '{LIED}' maps to ['model-00001-of-00002.safetensors'], not a file name",),
    ),
    Case(
        "index-not-json",
        "an index that is not JSON",
        broken(unreadable_index),
        ("model.safetensors.index.json", "not valid JSON"),
    ),
    # --- config.json against the tensors ---
    Case(
        "config-more-layers",
        "config.json says 6 layers, the tensors hold 2",
        broken(edit_config(num_hidden_layers=6)),
        (BAD, "num_hidden_layers is 6 but the weights hold 2 layers"),
    ),
    Case(
        "config-fewer-layers",
        "config.json says 1 layer, the tensors hold 2",
        broken(edit_config(num_hidden_layers=1)),
        (BAD, "num_hidden_layers is 1 but the weights hold 2 layers"),
    ),
    Case(
        "config-hidden-size",
        "config.json hidden_size disagrees with the embeddings",
        broken(edit_config(hidden_size=24)),
        (BAD, "hidden_size is 24", "model.embed_tokens.weight"),
    ),
    Case(
        "config-layer-gap",
        "a layer missing from the middle of the tensors",
        layer_gap,
        (BAD, "no tensors for layer(s) [2]"),
    ),
    Case(
        "config-not-json",
        "a config.json that is not JSON",
        broken(lambda bad: (bad / "config.json").write_text("{")),
        (BAD, "config.json: not valid JSON"),
    ),
    Case(
        "config-model-type",
        "a model_type transformers does not ship",
        broken(edit_config(model_type="my_custom_lm")),
        ("model_type 'my_custom_lm' is not one transformers",),
    ),
    Case(
        "config-untied-no-head",
        "an untied config.json whose weights lack lm_head",
        broken(edit_tensors(lambda t: t.pop("lm_head.weight"))),
        (BAD, "no 'lm_head.weight'", "tie_word_embeddings"),
    ),
    Case(
        "config-intermediate-size",
        "config.json intermediate_size disagrees with the MLP tensors",
        broken(edit_config(intermediate_size=48)),
        (BAD, "intermediate_size", "implies [48,"),
    ),
    Case(
        "tensor-missing",
        "one model lacks a tensor the others have",
        broken(edit_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))),
        ("tensor 'model.layers.1.mlp.up_proj.weight' is missing from model", BAD),
    ),
    # --- pickled weights ---
    Case(
        "pickle-refused",
        "only pytorch_model.bin, without --allow-pickle",
        broken(to_pickle),
        (BAD, "only pickled weights", "--allow-pickle"),
    ),
    Case(
        "pickle-index-refused",
        "a safetensors index pointing at .bin shards, without --allow-pickle",
        broken(pickle_shards("model.safetensors.index.json")),
        ("holds pickled weights", "--allow-pickle"),
    ),
    Case(
        "pickle-hostile",
        "with --allow-pickle: a pickle that would run code",
        broken(hostile_pickle),
        ("pytorch_model.bin", "refused by torch.load(weights_only=True)", "io.open"),
        PICKLE,
    ),
    Case(
        "pickle-garbage",
        "with --allow-pickle: a .bin that is random bytes",
        broken(garbage_pickle),
        ("pytorch_model.bin", "cannot load as PyTorch weights"),
        PICKLE,
    ),
    Case(
        "pickle-not-state-dict",
        "with --allow-pickle: a .bin holding a list",
        broken(list_pickle),
        ("pytorch_model.bin", "holds a list, not a state dict"),
        PICKLE,
    ),
    # --- NaN and Inf ---
    Case(
        "nan-input",
        "NaN in an input tensor",
        broken(poison(float("nan"))),
        (
            f"tensor '{LIED}'",
            "produced NaN or Inf",
            f"from NaN/Inf in input tensor '{LIED}' of '{BAD}'",
            "--allow-nonfinite",
        ),
    ),
    Case(
        "inf-input",
        "Inf in an input tensor",
        broken(poison(float("inf"))),
        (f"from NaN/Inf in input tensor '{LIED}'", "--allow-nonfinite"),
    ),
    Case(
        "overflow",
        "finite inputs whose merge overflows float32",
        lambda m, d: (
            broken(poison(3e38))(m, d)
            | {
                "models": [
                    {"model": str(d / "bad"), "parameters": {"weight": 4.0}},
                    {"model": str(m["ft1"]), "parameters": {"weight": -1.0}},
                ]
            }
        ),
        (f"tensor '{LIED}': the merge produced NaN or Inf values;", "--allow-nonfinite"),
    ),
]


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=lambda c: c.id)
def test_broken_checkpoint_fails_in_one_line(case, micro_models, tmp_path):
    result, out, needles = run_case(case, micro_models, tmp_path / case.id)
    assert_failed_cleanly(result, out, *needles)


def test_hostile_pickle_never_runs(micro_models, tmp_path):
    """weights_only=True refuses the pickle before its payload runs: the file it would create does not appear."""
    case = next(c for c in CHECKPOINT_CASES if c.id == "pickle-hostile")
    result, out, needles = run_case(case, micro_models, tmp_path / "case")
    assert_failed_cleanly(result, out, *needles)
    assert not (tmp_path / "case" / "bad" / "PWNED").exists()
    # The payload is real: an unrestricted torch.load does run it (so the check above can fail).
    torch.load(tmp_path / "case" / "bad" / "pytorch_model.bin", weights_only=False)
    assert (tmp_path / "case" / "bad" / "PWNED").exists()


def _expected_linear(a: Path, b: Path) -> dict[str, torch.Tensor]:
    ta, tb = load_tensors(a), load_tensors(b)
    return {n: (ta[n] + tb[n]) / 2 for n in ta}


def _assert_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, t in got.items():
        assert (t - want[name]).abs().max().item() <= TOL, name


@pytest.mark.parametrize(
    "layout",
    [to_pickle, pickle_shards("pytorch_model.bin.index.json"), pickle_shards("model.safetensors.index.json")],
    ids=["single-bin", "bin-index", "safetensors-index-to-bin"],
)
def test_allow_pickle_loads_bin_weights(layout, micro_models, tmp_path, monkeypatch):
    """With --allow-pickle, .bin weights merge to the same numbers as their safetensors twin, read by
    torch.load(weights_only=True, mmap=True)."""
    bad = shutil.copytree(micro_models["ft2"], tmp_path / "pickled")
    layout(bad)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    config = write_yaml(tmp_path / "c.yaml", linear_config(micro_models["ft1"], bad))
    refused = run_cli_in_process("merge", str(config), "-o", str(tmp_path / "refused"))
    assert refused.code == 2 and "--allow-pickle" in refused.stderr and not calls
    result = run_cli_in_process("merge", str(config), "-o", str(tmp_path / "out"), "--allow-pickle")
    assert result.code == 0, result.stderr
    assert calls and all(c.get("weights_only") is True and c.get("mmap") is True for c in calls)
    _assert_close(load_tensors(tmp_path / "out"), _expected_linear(micro_models["ft1"], micro_models["ft2"]))


def test_allow_pickle_reaches_moe_experts(micro_models, tmp_path):
    """The opt-in also covers the MoE builder: a pickled expert's MLP lands, unchanged, in its expert slot."""
    bad = shutil.copytree(micro_models["ft2"], tmp_path / "pickled")
    to_pickle(bad)
    cfg = {
        "base_model": str(micro_models["base"]),
        "gate_mode": "random",
        "experts": [{"source_model": str(micro_models["ft1"])}, {"source_model": str(bad)}],
    }
    config = write_yaml(tmp_path / "moe.yaml", cfg)
    refused = run_cli_in_process("merge", str(config), "-o", str(tmp_path / "refused"))
    assert refused.code == 2 and "--allow-pickle" in refused.stderr
    result = run_cli_in_process("merge", str(config), "-o", str(tmp_path / "out"), "--allow-pickle")
    assert result.code == 0, result.stderr
    got, src = load_tensors(tmp_path / "out"), load_tensors(micro_models["ft2"])
    for layer in range(2):
        for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            name = f"model.layers.{layer}.block_sparse_moe.experts.1.{w}.weight"
            assert torch.equal(got[name], src[f"model.layers.{layer}.mlp.{proj}.weight"]), name


def test_allow_pickle_is_scoped_to_one_call(micro_models, tmp_path):
    """The API option holds for its own call only: the next call without it refuses pickled weights again."""
    bad = shutil.copytree(micro_models["ft2"], tmp_path / "pickled")
    to_pickle(bad)
    cfg = linear_config(micro_models["ft1"], bad)
    moekit.merge(cfg, tmp_path / "out1", allow_pickle=True)
    with pytest.raises(moekit.UserError, match="--allow-pickle"):
        moekit.merge(cfg, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_nan_input_with_allow_nonfinite_warns_and_names_the_tensor(micro_models, tmp_path, caplog):
    bad = shutil.copytree(micro_models["ft2"], tmp_path / "bad")
    poison(float("nan"), index=(2, 7))(bad)
    with caplog.at_level(logging.WARNING, logger="moekit"):
        out = moekit.merge(linear_config(micro_models["ft1"], bad), tmp_path / "out", allow_nonfinite=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"input tensor '{LIED}' of '{bad}' holds NaN or Inf values"]
    got = load_tensors(out)[LIED]
    nan = torch.isnan(got)
    assert nan[2, 7] and int(nan.sum()) == 1  # NaN exactly where the input had it, nowhere else
