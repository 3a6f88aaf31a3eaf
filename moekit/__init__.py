"""moekit: streaming model merges, clown-MoE and upcycling, an MoE runtime, and routing statistics."""

from __future__ import annotations

from moekit._version import __version__
from moekit.errors import UserError

__all__ = [
    "UserError", "merge", "verify", "route_stats", "calibrate_router", "moe_forward", "MoELayer", "__version__"
]  # fmt: skip


def merge(config, out, **options):
    """Run a merge described by `config` (path, YAML text or dict) into directory `out`. See moekit.merging.api."""
    from moekit.merging.api import merge as _merge

    return _merge(config, out, **options)


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


_HF_MOE_MODULE = "transformers.integrations.moe"


def _register_with_transformers() -> None:
    """Make experts_implementation="moekit" available as soon as transformers' MoE integration is imported.

    Registering eagerly would import transformers (seconds, and ~100 MB) on every `import moekit`, which the merge
    CLI does not need. So: register now if that module is loaded, else when it is first imported.
    """
    import sys

    if _HF_MOE_MODULE in sys.modules:
        _register_now()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def _register_now() -> None:
    try:
        from moekit.runtime.hf import register_with_transformers
    except ImportError:  # transformers too old, or the runtime is unavailable: merging still works
        return
    register_with_transformers()


class _RegisterOnImport:
    """A meta-path finder that runs the registration right after transformers' MoE module finishes loading."""

    def find_spec(self, name, path=None, target=None):
        if name != _HF_MOE_MODULE:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register_now()

        spec.loader.exec_module = exec_and_register
        return spec


_register_with_transformers()
