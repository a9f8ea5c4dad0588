"""Bytes one rank receives through ``torch.distributed`` inside a ``with`` block, by operation.

Scale claims ("a rank receives O(its own shard), never O(world size)") are checked by counting,
not by timing: the meter wraps torch.distributed's send / receive entry points, in
``torch.distributed`` and in ``distributed_c10d`` (where ``*_object`` collectives look up the
tensor collectives they run on pickled bytes), and adds what THIS rank receives from others:

| operation                              | counted bytes (group of n ranks)                  |
|----------------------------------------|---------------------------------------------------|
| ``recv`` / ``irecv``                   | the tensor                                        |
| ``broadcast`` / ``scatter``            | the tensor, on every rank but ``src``             |
| ``all_gather`` / ``all_gather_into_tensor`` | (n-1) x the input                            |
| ``gather``                             | (n-1) x the input, on ``dst``                     |
| ``all_reduce`` / ``reduce``            | the tensor (its logical size, whatever the algorithm) |
| ``reduce_scatter_tensor``              | (n-1) x the output                                |
| ``all_to_all_single``                  | the output                                        |

``*_object`` calls are also counted by name in ``object_calls``: the package promises that no
tensor travels through one.

    meter = ReceivedBytes()
    with meter:
        export_peft(model, dst=0)
    meter.total, meter.by_op, meter.object_calls
"""

import inspect
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


def _n(bound) -> int:
    return dist.get_world_size(bound.get("group"))


def _me(bound) -> int:
    """This rank's global rank (src / dst arguments are global ranks)."""
    return dist.get_rank()


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


_COUNTERS = {
    "recv": lambda b: _nbytes(b["tensor"]),
    "irecv": lambda b: _nbytes(b["tensor"]),
    "broadcast": lambda b: 0 if b["src"] == _me(b) else _nbytes(b["tensor"]),
    "scatter": lambda b: 0 if b.get("src", 0) == _me(b) else _nbytes(b["tensor"]),
    "all_gather": lambda b: (_n(b) - 1) * _nbytes(b["tensor"]),
    "all_gather_into_tensor": lambda b: (_n(b) - 1) * _nbytes(b["input_tensor"]),
    "gather": lambda b: (_n(b) - 1) * _nbytes(b["tensor"]) if b.get("dst", 0) == _me(b) else 0,
    "all_reduce": lambda b: _nbytes(b["tensor"]) if _n(b) > 1 else 0,
    "reduce": lambda b: _nbytes(b["tensor"]) if b["dst"] == _me(b) and _n(b) > 1 else 0,
    "reduce_scatter_tensor": lambda b: (_n(b) - 1) * _nbytes(b["output"]),
    "all_to_all_single": lambda b: _nbytes(b["output"]) if _n(b) > 1 else 0,
}
_OBJECT_CALLS = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                 "send_object_list", "recv_object_list")


class ReceivedBytes:
    """Counts what this rank receives while active (one meter at a time)."""

    def __init__(self):
        self.by_op = Counter()
        self.object_calls = Counter()
        self._saved = []
        self._depth = 0  # a receive that torch runs through another one (recv -> irecv) counts once

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __enter__(self):
        for name, count in _COUNTERS.items():
            self._wrap(name, self._counting(name, count))
        for name in _OBJECT_CALLS:
            self._wrap(name, self._noting(name))
        return self

    def __exit__(self, *exc):
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()
        return False

    def _wrap(self, name, make):
        original = getattr(c10d, name, None)
        if original is None:
            return
        wrapped = make(original)
        for module in (dist, c10d):
            if getattr(module, name, None) is original:
                self._saved.append((module, name, original))
                setattr(module, name, wrapped)

    def _counting(self, name, count):
        def make(original):
            signature = inspect.signature(original)

            def wrapped(*args, **kwargs):
                if self._depth == 0:
                    bound = signature.bind(*args, **kwargs)
                    bound.apply_defaults()
                    self.by_op[name] += count(bound.arguments)
                self._depth += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    self._depth -= 1

            return wrapped

        return make

    def _noting(self, name):
        def make(original):
            def wrapped(*args, **kwargs):
                self.object_calls[name] += 1
                return original(*args, **kwargs)

            return wrapped

        return make
