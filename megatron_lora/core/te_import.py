"""Transformer Engine for the modules that need it: one guard, one readable error.

``te_layers.py`` and ``grouped_experts.py`` are the only modules that import TE; each calls
``require_te`` first, so on a machine without TE (or without CUDA) importing them fails with a
message that says what needs TE and what to use instead, not with an error from inside TE.
"""

from __future__ import annotations

import importlib


def require_te(module: str, instead: str) -> None:
    """Import Transformer Engine and Megatron's TE extension, or raise an ImportError saying
    that ``module`` needs it, how to install it, and ``instead``: what works without it."""
    try:
        importlib.import_module("transformer_engine")
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError as error:  # pragma: no cover - depends on the install
        have, failure = False, error
    else:
        have, failure = HAVE_TE, None
    if not have:
        raise ImportError(
            f"{module} needs Transformer Engine (CUDA only): install it with pip install "
            f"'megatron_lora[te]' on a CUDA machine, or {instead}. Import failed with: {failure}")
