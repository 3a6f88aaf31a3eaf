"""Load a model directory with transformers 4.x and 5.x, greedy-generate from the same prompt, compare the logits.

`moekit verify` checks the 4.x layout by tensor names (4.x has no fused-expert conversion); this script does the
real load, for when a 4.x install is at hand. transformers 4.x needs huggingface_hub < 1.0, so put it in its own
folder and point --site at it:

    pip install --target /tmp/t4 --no-deps transformers==4.57.1 huggingface_hub==0.36.0 tokenizers==0.22.1
    python bench/transformers4_load.py OUT [OUT ...] --site /tmp/t4

Each version runs in its own process on the same token ids (from transformers 5's tokenizer: a tokenizer saved
by transformers 5 names the class `TokenizersBackend`, which 4.x does not have); the table gives both
continuations (decoded by 5.x) and the largest logit difference.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = "def fibonacci(n):\n    "
PROBE = r"""
import sys, torch, transformers
from transformers import AutoModelForCausalLM
d, dest = sys.argv[1], sys.argv[2]
key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
model = AutoModelForCausalLM.from_pretrained(d, **{key: torch.float32}).eval()
ids = torch.tensor([[int(t) for t in sys.argv[3].split(",")]])
with torch.no_grad():
    logits = model(input_ids=ids).logits
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
torch.save({"logits": logits, "new": out[0, ids.shape[1]:]}, dest)
print(transformers.__version__)
"""


def probe(model_dir: Path, site: str | None, dest: Path, ids: list[int]) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(model_dir), str(dest), ",".join(map(str, ids))],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.exit(f"{model_dir}: the load failed ({'4.x' if site else '5.x'}):\n{proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--site", required=True, help="a folder holding transformers 4.x (see above)")
    args = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    print("| model | 4.x | 5.x | 4.x continuation | 5.x continuation | max abs logit diff |")
    print("|---|---|---|---|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            old, new = Path(tmp) / "old.pt", Path(tmp) / "new.pt"
            tok = AutoTokenizer.from_pretrained(model)
            ids = tok(PROMPT).input_ids
            v_old, v_new = probe(model, args.site, old, ids), probe(model, None, new, ids)
            if v_old.startswith("5"):
                sys.exit(f"--site {args.site}: it gives transformers {v_old}, not 4.x")
            a, b = torch.load(old), torch.load(new)
            diff = (a["logits"] - b["logits"]).abs().max().item()
            t_old, t_new = (repr(tok.decode(r["new"])) for r in (a, b))
            print(f"| {model.name} | {v_old} | {v_new} | {t_old} | {t_new} | {diff:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
