"""moekit's MoE outputs load in transformers 4.57 with no missing or unexpected keys, and compute 5.x's logits.

Builds Mixtral (clown-MoE from fine-tunes, hidden gates), Qwen2-MoE (shared expert) and Qwen3-MoE (upcycled with
noise) from tiny models with moekit, computes their logits with this process's transformers (5.x), then loads
each one in a separate venv with transformers 4.57 (made once under ./.cache/transformers-4.57-venv, with this
process's torch) and compares. As a control, mergekit-moe 0.1.5's Mixtral output (fused transformers-5 names) is
loaded in 4.57 too, when the mergekit venv of bench/_peer.py exists: 4.57 reports its experts and router missing.

    python bench/moe_transformers4.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _compare import table  # noqa: E402
from _peer import PEER_ENV, bench_dir  # noqa: E402

import moekit  # noqa: E402
from moekit.demo.tiny_models import make_base, make_finetune  # noqa: E402

TRANSFORMERS_4 = "4.57.*"

# Run inside the 4.57 venv: load each model, report loading info and logits.
CHILD = r"""
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1])
report = {"transformers": transformers.__version__}
for path in sys.argv[3:]:
    model, info = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    torch.save(logits, path + "/logits-4x.pt")
    report[path] = {"class": type(model).__name__, "missing": len(info["missing_keys"]), "unexpected": len(info["unexpected_keys"]),
                    "example": (info["missing_keys"] + info["unexpected_keys"])[:2]}
open(sys.argv[2], "w").write(json.dumps(report))
"""


def venv_python() -> Path:
    root = Path.cwd() / ".cache" / "transformers-4.57-venv"
    stamp = root / ".installed"
    if not stamp.is_file():
        print(f"making the transformers {TRANSFORMERS_4} venv in {root} (once)...", flush=True)
        venv.create(root, with_pip=True, clear=True)
        pins = root / "pins.txt"
        pins.write_text(f"torch=={torch.__version__}\n")  # the CPU torch already here; never a CUDA download
        pip = [str(root / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(pins)]
        subprocess.run(
            [*pip, f"torch=={torch.__version__}", f"transformers=={TRANSFORMERS_4}", "safetensors"],
            check=True,
        )
        stamp.touch()
    return root / "bin" / "python"


def build_outputs(root: Path) -> dict[str, Path]:
    llama = make_base(root / "llama", seed=0)
    fts = [make_finetune(llama, root / f"llama_ft{i}", seed=i, scale=0.02) for i in (1, 2, 3)]
    qwen2 = make_base(root / "qwen2", seed=4, model_type="qwen2")
    qwen2_ft = make_finetune(qwen2, root / "qwen2_ft", seed=5, scale=0.02)
    qwen3 = make_base(root / "qwen3", seed=6, model_type="qwen3")
    prompts = [["def merge(models):"], ["Permission is hereby granted"], ["The quick brown fox"]]
    configs = {
        "mixtral (clown, hidden)": {
            "base_model": str(llama),
            "gate_mode": "hidden",
            "experts": [{"source_model": str(f), "positive_prompts": p} for f, p in zip(fts, prompts)],
        },
        "qwen2_moe (shared expert)": {
            "base_model": str(qwen2),
            "gate_mode": "hidden",
            "experts": [
                {"source_model": str(m), "positive_prompts": p}
                for m, p in zip((qwen2, qwen2_ft, qwen2_ft), prompts)
            ],
            "shared_experts": [{"source_model": str(qwen2), "positive_prompts": ["import torch"]}],
        },
        "qwen3_moe (upcycle, noise)": {
            "merge_method": "moe",
            "base_model": str(qwen3),
            "gate_mode": "random",
            "upcycle": {"num_experts": 4, "noise_scale": 0.01},
        },
    }
    return {
        name: moekit.merge(cfg, root / name.split()[0], force=True, seed=1) for name, cfg in configs.items()
    }, configs


def mergekit_control(root: Path, config: dict) -> Path | None:
    """mergekit-moe 0.1.5's output for the Mixtral config, if its venv exists (bench/_peer.py makes it)."""
    exe = bench_dir() / "mergekit-0.1.5-venv" / "bin" / "mergekit-moe"
    if not exe.is_file():
        return None
    import yaml

    cfg_path = root / "mergekit.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    out = root / "mergekit-mixtral"
    proc = subprocess.run(
        [str(exe), str(cfg_path), str(out), "--device", "cpu"],
        env={**os.environ, **PEER_ENV},
        capture_output=True,
        text=True,
    )
    return out if proc.returncode == 0 else None


def main() -> None:
    root = Path.cwd() / ".cache" / "moe_transformers4"
    root.mkdir(parents=True, exist_ok=True)
    outputs, configs = build_outputs(root)
    control = mergekit_control(root, configs["mixtral (clown, hidden)"])
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, root / "ids.pt")
    from transformers import AutoModelForCausalLM

    logits5 = {}
    for name, path in outputs.items():
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
        with torch.no_grad():
            logits5[name] = model.eval()(input_ids=ids).logits
    paths = [str(p) for p in outputs.values()] + ([str(control)] if control else [])
    report_path = root / "report-4x.json"
    subprocess.run(
        [str(venv_python()), "-c", CHILD, str(root / "ids.pt"), str(report_path), *paths],
        check=True,
        env={**os.environ, **PEER_ENV},
    )
    report = json.loads(report_path.read_text())
    import transformers

    rows = []
    for name, path in outputs.items():
        r = report[str(path)]
        diff = (torch.load(path / "logits-4x.pt") - logits5[name]).abs().max().item()
        rows.append([name, r["class"], r["missing"], r["unexpected"], f"{diff:.1e}"])
    if control:
        r = report[str(control)]
        rows.append(
            [
                "control: mergekit-moe 0.1.5 mixtral",
                r["class"],
                r["missing"],
                r["unexpected"],
                "n/a (random weights)",
            ]
        )
    print(
        f"transformers {transformers.__version__} (this process) vs {report['transformers']} (venv), float32"
    )
    print(table(["output", "4.x class", "missing keys", "unexpected keys", "max |logits 4.x - 5.x|"], rows))
    if control:
        print(f"control's first missing/unexpected keys in 4.x: {report[str(control)]['example']}")


if __name__ == "__main__":
    main()
