"""`RouteStats`: the accumulated routing counts of one run, its metadata, and every metric derived from them."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from moekit.stats import metrics
from moekit.stats.accumulate import RoutingAccumulator
from moekit.stats.outputs import write_file


@dataclass
class RouteStats:
    """Routing statistics of an MoE model over a set of prompts.

    Raw sums (see `RoutingAccumulator`) are kept so any metric can be recomputed; `layers[i]` is the model's
    layer index of the i-th MoE layer (dense layers, e.g. Qwen's `mlp_only_layers`, are not listed).
    Metrics follow the definitions in `moekit.stats.metrics`; "overall" values are means over MoE layers,
    except counts and fractions, which are pooled (summed) over layers. `expert_names[e]` names expert e's
    source model when the MoE came from moekit (see `moekit.stats.experts`), else it is None.
    """

    model: str
    architecture: str
    num_experts: int
    top_k: int
    layers: list[int]
    tokens: int
    counts: np.ndarray
    top1_counts: np.ndarray
    prob_sums: np.ndarray
    entropy_bits_sums: np.ndarray
    top1_prob_sums: np.ndarray
    coselection: np.ndarray
    adjacent_top1_agree: np.ndarray
    adjacent_topk_shared: np.ndarray
    label_counts: dict[str, np.ndarray] = field(default_factory=dict)
    label_tokens: dict[str, int] = field(default_factory=dict)
    sources: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    moekit_version: str = ""
    expert_names: list[str] | None = None  # each expert's source model, when moekit built the MoE

    @classmethod
    def from_accumulator(cls, acc: RoutingAccumulator, **metadata) -> RouteStats:
        """Freeze an accumulator's sums together with run metadata (model, architecture, layers, ...)."""
        return cls(
            num_experts=acc.num_experts,
            top_k=acc.top_k,
            tokens=acc.tokens,
            counts=acc.counts,
            top1_counts=acc.top1_counts,
            prob_sums=acc.prob_sums,
            entropy_bits_sums=acc.entropy_bits_sums,
            top1_prob_sums=acc.top1_prob_sums,
            coselection=acc.coselection,
            adjacent_top1_agree=acc.adjacent_top1_agree,
            adjacent_topk_shared=acc.adjacent_topk_shared,
            label_counts=dict(acc.label_counts),
            label_tokens=dict(acc.label_tokens),
            **metadata,
        )

    # ---- per-layer metrics ([L] or [L, E]) -------------------------------------------------------------
    @property
    def fractions(self) -> np.ndarray:
        return metrics.fractions(self.counts, self.top_k, self.tokens)

    @property
    def mean_probs(self) -> np.ndarray:
        return self.prob_sums / self.tokens

    @property
    def max_over_mean(self) -> np.ndarray:
        return metrics.max_over_mean(self.counts)

    @property
    def cv(self) -> np.ndarray:
        return metrics.coefficient_of_variation(self.counts)

    @property
    def switch_aux(self) -> np.ndarray:
        return metrics.switch_aux(self.fractions, self.mean_probs)

    @property
    def entropy_bits(self) -> np.ndarray:
        return self.entropy_bits_sums / self.tokens

    @property
    def top1_prob(self) -> np.ndarray:
        return self.top1_prob_sums / self.tokens

    @property
    def dead(self) -> np.ndarray:
        return metrics.dead_experts(self.fractions)

    @property
    def top1_agreement(self) -> np.ndarray:
        return self.adjacent_top1_agree / self.tokens

    @property
    def top1_chance(self) -> np.ndarray:
        return metrics.chance_agreement(self.top1_counts, self.tokens)

    @property
    def topk_overlap(self) -> np.ndarray:
        return self.adjacent_topk_shared / float(self.top_k * self.tokens)

    @cached_property
    def specialisation(self) -> metrics.Specialisation | None:
        """Label-vs-expert report; None without labelled prompts (or with a single label)."""
        if len(self.label_counts) < 2:
            return None
        return metrics.specialisation(self.label_counts)

    # ---- serialisation ----------------------------------------------------------------------------------
    def overall(self) -> dict:
        """Scalars over the whole model: means over MoE layers, pooled counts, and the dead-expert list."""
        pooled = self.counts.sum(axis=0)
        dead = [(int(self.layers[i]), int(e)) for i, e in zip(*np.nonzero(self.dead))]
        out = {
            "counts": pooled.tolist(),
            "fractions": (pooled / pooled.sum()).tolist(),
            "max_over_mean": float(self.max_over_mean.mean()),
            "worst_max_over_mean": float(self.max_over_mean.max()),
            "cv": float(self.cv.mean()),
            "switch_aux": float(self.switch_aux.mean()),
            "entropy_bits": float(self.entropy_bits.mean()),
            "max_entropy_bits": float(np.log2(self.num_experts)),
            "top1_prob": float(self.top1_prob.mean()),
            "dead_experts": [{"layer": layer, "expert": e} for layer, e in dead],
            "num_dead_experts": len(dead),
            "coselection": self.coselection.sum(axis=0).tolist(),
            "top1_agreement": _mean_or_none(self.top1_agreement),
            "top1_chance": _mean_or_none(self.top1_chance),
            "topk_overlap": _mean_or_none(self.topk_overlap),
        }
        spec = self.specialisation
        if spec is not None:
            out["mutual_information_bits"] = spec.mean_mi_bits
            out["mutual_information_normalised"] = spec.mean_mi_normalised
        return out

    def per_layer(self) -> list[dict]:
        """One dict per MoE layer with every per-layer number."""
        spec = self.specialisation
        rows = []
        for i, layer in enumerate(self.layers):
            row = {
                "layer": int(layer),
                "counts": self.counts[i].tolist(),
                "fractions": self.fractions[i].tolist(),
                "top1_counts": self.top1_counts[i].tolist(),
                "mean_router_prob": self.mean_probs[i].tolist(),
                "max_over_mean": float(self.max_over_mean[i]),
                "cv": float(self.cv[i]),
                "switch_aux": float(self.switch_aux[i]),
                "entropy_bits": float(self.entropy_bits[i]),
                "top1_prob": float(self.top1_prob[i]),
                "dead_experts": np.nonzero(self.dead[i])[0].tolist(),
                "coselection": self.coselection[i].tolist(),
            }
            if i + 1 < len(self.layers):
                row["next_layer"] = {
                    "layer": int(self.layers[i + 1]),
                    "top1_agreement": float(self.top1_agreement[i]),
                    "top1_chance": float(self.top1_chance[i]),
                    "topk_overlap": float(self.topk_overlap[i]),
                }
            if self.label_counts:
                row["labels"] = {
                    label: {
                        "counts": counts[i].tolist(),
                        "fractions": (counts[i] / counts[i].sum()).tolist(),
                        "top_expert": int(counts[i].argmax()),
                    }
                    for label, counts in self.label_counts.items()
                }
            if spec is not None:
                row["mutual_information_bits"] = float(spec.mi_bits[i])
                row["mutual_information_normalised"] = float(spec.mi_normalised[i])
            rows.append(row)
        return rows

    def specialisation_dict(self) -> dict | None:
        spec = self.specialisation
        if spec is None:
            return None
        return {
            "labels": list(spec.labels),
            "tokens": {y: int(self.label_tokens[y]) for y in spec.labels},
            "distribution": {y: spec.distribution[y].tolist() for y in spec.labels},
            "top_expert": spec.top_expert,
            "top_share": spec.top_share,
            "mutual_information_bits": spec.mean_mi_bits,
            "mutual_information_normalised": spec.mean_mi_normalised,
        }

    def to_dict(self) -> dict:
        """Every number and the run's metadata, as plain JSON-ready Python."""
        return {
            "moekit_version": self.moekit_version,
            "model": {
                "path": self.model,
                "architecture": self.architecture,
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "moe_layers": [int(x) for x in self.layers],
                "expert_names": self.expert_names,
            },
            "prompts": self.sources,
            "settings": self.settings,
            "tokens": int(self.tokens),
            "label_tokens": {k: int(v) for k, v in self.label_tokens.items()},
            "definitions": metrics.DEFINITIONS,
            "overall": self.overall(),
            "layers": self.per_layer(),
            "specialisation": self.specialisation_dict(),
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The `to_dict` JSON text (strict JSON: no NaN or Infinity); also written to `path` when given, whole or
        not at all (temporary file and rename)."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        if path is not None:
            write_file(path, (text + "\n").encode("utf-8"))
        return text

    def to_csv(self, path: str | Path | None = None) -> str:
        """One row per (layer, expert): load, router probability, top-1 count, dead flag, and per-label counts,
        followed by that layer's scalar metrics (repeated on each of its rows, so the file filters cleanly)."""
        labels = list(self.label_counts)
        header = ["layer", "expert", "count", "fraction", "top1_count", "mean_router_prob", "dead"]
        header += [f"count[{y}]" for y in labels]
        header += [
            "layer_max_over_mean",
            "layer_cv",
            "layer_switch_aux",
            "layer_entropy_bits",
            "layer_top1_prob",
        ]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        fractions, probs, dead = self.fractions, self.mean_probs, self.dead
        layer_scalars = np.stack(
            [self.max_over_mean, self.cv, self.switch_aux, self.entropy_bits, self.top1_prob]
        )
        for i, layer in enumerate(self.layers):
            for e in range(self.num_experts):
                row = [layer, e, int(self.counts[i, e]), repr(float(fractions[i, e]))]
                row += [int(self.top1_counts[i, e]), repr(float(probs[i, e])), int(dead[i, e])]
                row += [int(self.label_counts[y][i, e]) for y in labels]
                row += [repr(float(v)) for v in layer_scalars[:, i]]
                writer.writerow(row)
        text = buffer.getvalue()
        if path is not None:
            write_file(path, text.encode("utf-8"))
        return text


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None
