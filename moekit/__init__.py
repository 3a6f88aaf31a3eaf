"""moekit: streaming model merges, clown-MoE and upcycling, an MoE runtime, and routing statistics."""

from __future__ import annotations

__version__ = "0.1.0"

from moekit.errors import UserError

__all__ = ["UserError", "merge", "route_stats", "moe_forward", "MoELayer", "__version__"]


def merge(config, out, **options):
    """Run a merge described by `config` (path, YAML text or dict) into directory `out`. See moekit.merging.api."""
    from moekit.merging.api import merge as _merge

    return _merge(config, out, **options)


def route_stats(model_or_path, prompts, **options):
    """Collect routing statistics for an MoE model. See moekit.stats."""
    from moekit.stats import route_stats as _route_stats

    return _route_stats(model_or_path, prompts, **options)


def __getattr__(name):
    # The runtime pulls in torch kernels; keep `import moekit` cheap for the merge CLI.
    if name in ("moe_forward", "MoELayer"):
        import moekit.runtime as rt

        return getattr(rt, name)
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")


def _register_with_transformers() -> None:
    """`import moekit` makes experts_implementation="moekit" available when transformers is installed."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return
    try:
        from moekit.runtime.hf import register_with_transformers
    except ImportError:  # runtime not importable (e.g. partial install): merging still works
        return
    register_with_transformers()


_register_with_transformers()
