"""What each merge method declares that needs no torch: its parameter names, and the working memory it takes.

The methods themselves (merging/methods/*) import torch, which costs seconds; a misspelled method or parameter
name is a user error that should come back in a fraction of a second (moekit/preflight.py), and a dry run's
memory estimate needs each method's working memory. tests/test_memory_estimate.py checks this table against
the registry, name by name, so the two cannot drift apart.

`scratch` is the memory a method holds at its peak for one output tensor, beyond its inputs and base, output
included: `fixed + per_model * n` tensors of the input's size held in float32 (the methods work in float32 for
half-precision inputs), for n models besides the base. The figures are the peak RSS measured around one call on
2048x2048 float32 inputs, n = 1, 2, 3, the larger of two runs (`python bench/method_scratch.py` measures them
again; RSS is noisy by up to ~2 copies where freed memory is reused).
"""

from __future__ import annotations

from typing import NamedTuple

# The parameters of the sparsified task-vector family (methods/task_vectors.py), in its order.
_TASK_VECTOR = ("lambda", "normalize", "rescale", "rescale_norm", "int8_mask")


class MethodFacts(NamedTuple):
    per_model: tuple[str, ...]  # parameters given per model (models[i].parameters)
    shared: tuple[str, ...]  # global parameters (top-level or slice parameters)
    scratch: tuple[float, float]  # (fixed, per model) float32 copies of one input: see the module docstring


METHOD_FACTS: dict[str, MethodFacts] = {
    "arcee_fusion": MethodFacts((), (), (5.3, 0.0)),
    "breadcrumbs": MethodFacts(("weight", "density", "gamma"), _TASK_VECTOR, (6.6, 0.0)),
    "breadcrumbs_ties": MethodFacts(("weight", "density", "gamma"), (*_TASK_VECTOR, "sign_vote"), (7.2, 0.0)),
    "dare_linear": MethodFacts(("weight", "density"), _TASK_VECTOR, (0.3, 0.0)),  # + its draws (engine.py)
    "dare_ties": MethodFacts(("weight", "density"), (*_TASK_VECTOR, "sign_vote"), (0.3, 0.0)),
    "della": MethodFacts(("weight", "density", "epsilon"), (*_TASK_VECTOR, "sign_vote"), (4.4, 0.0)),
    "della_linear": MethodFacts(("weight", "density", "epsilon"), _TASK_VECTOR, (4.4, 0.0)),
    "karcher": MethodFacts((), ("max_iter", "tol"), (5.3, 1.0)),
    "linear": MethodFacts(("weight",), ("normalize",), (1.2, 0.0)),
    "model_stock": MethodFacts((), ("filter_wise",), (4.3, 0.0)),
    "multislerp": MethodFacts(("weight",), ("normalize_weights", "eps"), (7.3, 0.0)),
    "nearswap": MethodFacts((), ("t",), (3.1, 0.0)),
    "nuslerp": MethodFacts(("weight",), ("nuslerp_flatten", "nuslerp_row_wise"), (6.3, 0.0)),
    "passthrough": MethodFacts(("scale",), (), (0.0, 0.0)),
    "ram": MethodFacts((), ("epsilon",), (5.0, 4.3)),
    "ramplus_tl": MethodFacts((), ("r", "alpha", "epsilon"), (5.2, 4.4)),
    "sce": MethodFacts((), ("select_topk", "int8_mask"), (1.5, 3.1)),
    "slerp": MethodFacts((), ("t",), (1.3, 0.0)),
    "task_arithmetic": MethodFacts(("weight",), ("lambda", "normalize"), (0.2, 0.0)),
    "ties": MethodFacts(("weight", "density"), (*_TASK_VECTOR, "sign_vote"), (6.2, 1.0)),
}


def parameter_names(method: str) -> set[str]:
    facts = METHOD_FACTS[method]
    return {*facts.per_model, *facts.shared}


def all_parameter_names() -> set[str]:
    return {name for method in METHOD_FACTS for name in parameter_names(method)}
