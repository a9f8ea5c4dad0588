"""Counting the collectives a block of code issues: how the tests (and
``benchmarks/bench_lora_tp2.py``) check that a LoRA layer issues exactly its base layer's
collectives (docs/design.md §3).

A test instrument, not part of the library: it patches ``torch.distributed`` and Megatron's
import-time aliases for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
from typing import Dict

import torch
import torch.distributed as dist

_COUNTED = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather",
            "reduce_scatter", "broadcast", "scatter", "_all_gather_base", "_reduce_scatter_base",
            "send", "recv", "isend", "irecv", "batch_isend_irecv", "all_to_all_single")


class CollectiveLog:
    """Calls and payload bytes of each collective seen inside ``count_collectives()``."""

    def __init__(self):
        self.calls: Dict[str, int] = {}
        self.bytes: Dict[str, int] = {}

    def record(self, name: str, tensor) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        nbytes = tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0
        self.bytes[name] = self.bytes.get(name, 0) + nbytes

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


@contextlib.contextmanager
def count_collectives():
    """Count every ``torch.distributed`` collective issued inside the block.

    Megatron-Core binds ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` to module globals at
    import time (``dist_all_gather_func`` ...), so those aliases are wrapped as well: a count that
    misses the base layer's own gathers would make any comparison meaningless.
    Bytes are those of the tensor argument of each call (the payload a rank contributes).
    """
    log = CollectiveLog()
    saved = []

    def wrap(owner, attr, name):
        original = getattr(owner, attr)

        def counted(*args, **kwargs):
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if name in ("all_gather_into_tensor", "_all_gather_base", "reduce_scatter_tensor",
                        "_reduce_scatter_base") and len(args) > 1:
                tensor = args[1]  # (output, input): the input is what a rank sends
            log.record(name, tensor)
            return original(*args, **kwargs)

        saved.append((owner, attr, original))
        setattr(owner, attr, counted)

    for name in _COUNTED:
        if hasattr(dist, name):
            wrap(dist, name, name)
    try:
        from megatron.core.tensor_parallel import layers as mc_layers
        from megatron.core.tensor_parallel import mappings as mc_mappings

        for module in (mc_mappings, mc_layers):
            for alias, name in (("dist_all_gather_func", "all_gather_into_tensor"),
                                ("dist_reduce_scatter_func", "reduce_scatter_tensor")):
                if hasattr(module, alias):
                    wrap(module, alias, name)
    except ImportError:  # counting plain torch code needs no Megatron
        pass
    try:
        yield log
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)
