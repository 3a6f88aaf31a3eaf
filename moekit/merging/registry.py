"""The merge-method registry: each method is a small pure function with its parameters declared.

A method receives the input tensors of one output tensor (already in the compute dtype, in config order) and
returns the merged tensor. Per-model parameters arrive as lists aligned with `tensors`; global parameters arrive
as scalars. Gradients and filters are resolved by the planner before the call, so methods never see them.

    @merge_method("task_arithmetic", base="required", params=[Param("weight", float, per_model=True), ...])
    def task_arithmetic(tensors, base, *, weight, lambda_, normalize): ...

The input tensors are fresh copies that the engine never reads again, so a method may overwrite them in place
to save memory; the planner guarantees no two inputs share storage.

A method raises ValueError for a problem with the numbers; the engine turns it into a one-line error that names
the tensor. A problem its parameters alone show (weights summing to zero) is declared as `check_tensor`, which the
planner runs for every tensor, so that it is refused before anything is read, by a dry run too.
"""

from __future__ import annotations

import inspect
import keyword
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from moekit.config import MergeConfig, coerce_setting, edit_distance
from moekit.errors import UserError, did_you_mean

log = logging.getLogger(__name__)

REQUIRED: Any = object()


@dataclass(frozen=True)
class Param:
    """A declared method parameter. `check` returns an error text for a bad value, or None."""

    name: str
    kind: type  # float, int, bool or str
    default: Any = REQUIRED
    per_model: bool = False
    check: Callable[[Any], str | None] | None = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def py_name(self) -> str:
        return self.name + "_" if keyword.iskeyword(self.name) else self.name


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., Any]
    params: tuple[Param, ...]
    base: Literal["required", "optional", "ignored"]
    min_models: int
    max_models: int | None
    elementwise: bool  # output[i] depends only on inputs[i]: the engine may stream row chunks
    random: bool  # takes `rng`: the run's torch.Generator, or its pre-drawn Uniforms when `draws` is declared
    # The shapes of the U[0,1) draws the method makes for one output tensor, in order, from its resolved params
    # and the output shape; when declared, the engine draws them ahead and passes them as `rng`.
    draws: Callable[[dict[str, Any], tuple[int, ...]], list[tuple[int, ...]]] | None
    doc: str
    # mergekit's kernel returns fp32 from half-precision inputs (arcee_fusion's fp32 mask, ramplus_tl's fp32 scale)
    returns_float32: bool = False
    # A check of one output tensor's resolved parameters (gradients give each tensor its own values): an error
    # text, or None. The planner makes it for every tensor, so a dry run refuses what the run itself would.
    check_tensor: Callable[[dict[str, Any]], str | None] | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def takes_mergekit_order(self) -> bool:
        """The method takes `mergekit_order`: with `compute_dtype: mergekit` it then breaks ties (equal
        magnitudes at a top-k threshold) with the sort mergekit uses, which a faster selection cannot know."""
        return "mergekit_order" in inspect.signature(self.fn).parameters


METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    params: Sequence[Param] = (),
    base: Literal["required", "optional", "ignored"] = "ignored",
    min_models: int = 1,
    max_models: int | None = None,
    elementwise: bool = False,
    random: bool = False,
    draws: Callable[[dict[str, Any], tuple[int, ...]], list[tuple[int, ...]]] | None = None,
    returns_float32: bool = False,
    check_tensor: Callable[[dict[str, Any]], str | None] | None = None,
):
    """Register `fn` as merge method `name`."""

    def register(fn):
        if name in METHODS:
            raise RuntimeError(f"merge method {name!r} registered twice")
        METHODS[name] = MergeMethod(
            name,
            fn,
            tuple(params),
            base,
            min_models,
            max_models,
            elementwise,
            random or draws is not None,
            draws,
            (fn.__doc__ or "").strip(),
            returns_float32,
            check_tensor,
        )
        return fn

    return register


def get_method(name: object, where: str = "merge_method") -> MergeMethod:
    from moekit.merging import methods  # noqa: F401 - importing registers every method

    if not isinstance(name, str) or name not in METHODS:
        raise unknown_method(name, METHODS, where)
    return METHODS[name]


def unknown_method(name: object, known: Iterable[str], where: str) -> UserError:
    """The error for a merge_method that is not one of `known` (the registry's, or before torch is imported the
    names in method_table.py)."""
    listing = ", ".join(sorted(known))
    return UserError(
        f"{where}: unknown merge method {name!r}{did_you_mean(str(name), known)}; known: {listing}"
    )


def unknown_parameter(
    method: str, takes: set[str], key: str, where: str, any_method: set[str]
) -> UserError | None:
    """The error for a parameter `key` that `method` (whose parameters are `takes`) lacks, or None when another
    method takes it and it is no typo of one of this method's: a leftover from switching methods, which mergekit
    ignores (a warning)."""
    near = [k for k in takes if edit_distance(str(key), k) <= 1]
    if key in any_method and not near:
        return None
    hint = did_you_mean(key, near or takes or any_method)
    listing = ", ".join(sorted(takes)) or "no parameters"
    return UserError(f"{where}: '{method}' has no parameter '{key}'{hint}; it takes: {listing}")


def method_for(config: MergeConfig) -> MergeMethod:
    """The config's merge method, with every parameter in the config checked against it (see check_parameters)."""
    name = str(config.path) if config.path else "<config>"
    method = get_method(config.merge_method, f"{name}: merge_method")
    check_parameters(config, method, name)
    return method


def check_parameters(config: MergeConfig, method: MergeMethod, name: str) -> None:
    """Every parameter name is known, placed where it can act, and every value valid; values are read as mergekit
    reads them (pydantic's lax mode: "1e-5" is a number for a float parameter, 0 and 1 are booleans).

    mergekit ignores a parameter the method does not take, and people switch `merge_method:` in a config that
    still carries the old method's parameters: a name some method knows is a warning. A name no method knows, or
    one an edit away from a parameter of this method (a typo), is an error with a suggestion."""
    known = {p.name for p in method.params}
    ignored: dict[str, list[str]] = {}

    def check_block(params: dict, where: str, per_model_block: bool) -> None:
        for key, setting in list(params.items()):
            p = method.param(key)
            if p is None:
                error = unknown_parameter(method.name, known, key, where, known_parameter_names())
                if error is not None:
                    raise error
                ignored.setdefault(f"'{method.name}' does not use '{key}'", []).append(where)
                continue
            if per_model_block and not p.per_model:
                ignored.setdefault(
                    f"'{key}' is a global parameter of '{method.name}': it counts only in the top-level or slice "
                    "parameters",
                    [],
                ).append(where)
                continue
            params[key] = coerce_setting(p, setting, f"{where}.{key}")

    check_block(config.parameters, f"{name}: parameters", False)
    if config.modules:
        check_block(config.module_parameters, f"{name}: modules.{config.modules[0]}.parameters", False)
    for src in config.models or []:
        check_block(src.parameters, f"{src.where}.parameters", True)
    for sl in config.slices or []:
        check_block(sl.parameters, f"{sl.where}.parameters", False)
        for src in sl.sources:
            check_block(src.parameters, f"{src.where}.parameters", True)
    for what, wheres in ignored.items():
        shown = ", ".join(w.removeprefix(f"{name}: ") for w in wheres[:3]) + (
            ", ..." if len(wheres) > 3 else ""
        )
        log.warning("%s: %s (in %s; mergekit ignores it too)", name, what, shown)


def known_parameter_names() -> set[str]:
    return {p.name for m in METHODS.values() for p in m.params}


# Shared checks, so every method words its range errors the same way.
def in_range(lo: float, hi: float, lo_open: bool = False) -> Callable[[Any], str | None]:
    def check(v):
        ok = (lo < v if lo_open else lo <= v) and v <= hi
        return None if ok else f"must be in {'(' if lo_open else '['}{lo}, {hi}]"

    return check


def non_negative(v) -> str | None:
    return None if v >= 0 else "must be >= 0"


def positive(v) -> str | None:
    return None if v > 0 else "must be > 0"
