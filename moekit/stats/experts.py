"""Names for the experts of an MoE that moekit built: its recipe, `moekit_config.yaml`, says where each came from.

Expert e of a clown-MoE is `experts[e].source_model` (the builder keeps the config's order); every expert of an
upcycled model is a copy of `base_model`. A name is the source's last path component, numbered `#i` where
several experts share a source. Any other recipe (a dense merge, a hand-edited file) names nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import yaml

RECIPE_NAME = "moekit_config.yaml"


def expert_names(model_dir: str | Path, num_experts: int) -> list[str] | None:
    """One name per routed expert, from the recipe in `model_dir`; None without a matching recipe."""
    recipe = Path(model_dir) / RECIPE_NAME
    if not recipe.is_file():
        return None
    try:
        raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    sources = _expert_sources(raw) if isinstance(raw, dict) else None
    if sources is None:
        return None
    if len(sources) != num_experts:
        logging.getLogger("moekit").warning(
            "%s lists %d experts but the model has %d; experts are shown by index",
            recipe,
            len(sources),
            num_experts,
        )
        return None
    short = [Path(source.rstrip("/")).name or source for source in sources]
    shared = Counter(short)
    seen: Counter[str] = Counter()
    names = []
    for name in short:
        if shared[name] > 1:
            names.append(f"{name}#{seen[name]}")
            seen[name] += 1
        else:
            names.append(name)
    return names


def _expert_sources(raw: dict) -> list[str] | None:
    upcycle, base = raw.get("upcycle"), raw.get("base_model")
    if isinstance(upcycle, dict) and isinstance(base, str):
        count = upcycle.get("num_experts")
        return (
            [base] * count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None
        )
    experts = raw.get("experts")
    if isinstance(experts, list) and experts:
        sources = [e.get("source_model") if isinstance(e, dict) else None for e in experts]
        if all(isinstance(s, str) and s.strip() for s in sources):
            return sources
    return None
