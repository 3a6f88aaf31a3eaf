"""moekit: streaming model merges, clown-MoE and upcycling, an MoE runtime, and routing statistics."""

from __future__ import annotations

from moekit._version import __version__
from moekit.errors import UserError
from moekit.transformers_io import register_experts_on_import

__all__ = [
    "UserError", "merge", "verify", "route_stats", "calibrate_router", "moe_forward", "MoELayer", "__version__"
]  # fmt: skip


def merge(config, out=None, options=None, **keywords):
    """Run a merge described by `config` (path, YAML text or dict) into directory `out`, as `options` (a
    MergeOptions) and the keyword options say. See moekit.merging.api."""
    from moekit.merging.api import merge as _merge

    return _merge(config, out, options, **keywords)


def verify(out, **options):
    """Check a merge output: shards, finite tensors, shapes, a transformers load, the recipe's rerun. See
    moekit.verification."""
    from moekit.verification import verify as _verify

    return _verify(out, **options)


def route_stats(model_or_path, prompts, **options):
    """Collect routing statistics for an MoE model. See moekit.stats."""
    from moekit.stats import route_stats as _route_stats

    return _route_stats(model_or_path, prompts, **options)


def calibrate_router(moe_dir, data, out, **options):
    """Train only the routers of an MoE on labelled text, with before/after routing stats. See moekit.calibrate."""
    from moekit.calibrate import calibrate_router as _calibrate_router

    return _calibrate_router(moe_dir, data, out, **options)


def __getattr__(name):
    # The runtime pulls in torch kernels; keep `import moekit` cheap for the merge CLI.
    if name in ("moe_forward", "MoELayer"):
        import moekit.runtime as rt

        return getattr(rt, name)
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")


register_experts_on_import()  # experts_implementation="moekit", once transformers' MoE module loads
