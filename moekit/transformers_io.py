"""What moekit asks of transformers outside the runtime: loading from local directories, and registering
`experts_implementation="moekit"` when transformers' MoE module loads.

Every load goes through `load_config` / `load_tokenizer` / `load_model`: local files only (never the hub) and
never `trust_remote_code`, whatever the caller passes. Importing transformers costs seconds, and `import moekit`
(the merge CLI) should not pay for it, so this module imports it only inside these functions, and the
registration waits for transformers' MoE module with an import hook (`from_pretrained` always imports it first).
"""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path
from typing import Any

LOCAL = {"local_files_only": True, "trust_remote_code": False}
HF_MOE_MODULE = "transformers.integrations.moe"


def load_config(path: str | Path, **options: Any):
    """transformers' AutoConfig of a local model directory."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), **options, **LOCAL)


def load_tokenizer(path: str | Path, **options: Any):
    """transformers' AutoTokenizer of a local directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), **options, **LOCAL)


def load_model(path: str | Path, **options: Any):
    """transformers' AutoModelForCausalLM of a local directory (`options` as from_pretrained's: dtype, ...)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **options, **LOCAL)


def _register_experts() -> None:
    try:
        from moekit.runtime.hf import register_with_transformers
    except ImportError:  # the runtime is unavailable (no torch kernels): merging still works
        return
    register_with_transformers()


class _RegisterOnImport:
    """A meta-path finder that finds nothing itself; wraps the loader of transformers' MoE module so that loading it registers moekit."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != HF_MOE_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _register_experts()

        spec.loader.exec_module = exec_module
        return spec


def register_experts_on_import() -> None:
    """Make experts_implementation="moekit" available now if transformers' MoE module is loaded, else the moment
    it is. Idempotent."""
    if HF_MOE_MODULE in sys.modules:
        _register_experts()
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
