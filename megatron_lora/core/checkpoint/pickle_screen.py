"""Screening a dist checkpoint before it is read, so that loading it cannot run code from its files.

torch DCP unpickles ``.metadata`` with plain pickle and byte items with ``weights_only=False``,
and megatron-core 0.13 reads ``common.pt`` with ``weights_only=False``: each is checked here first.
"""

from __future__ import annotations

import os
import pickle
from typing import Optional

import torch

from megatron_lora.core.checkpoint.errors import CheckpointError


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_ALLOWED_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}


class MetadataUnpickler(pickle.Unpickler):
    """Reads a dist checkpoint's ``.metadata``: plain data classes of torch DCP / Megatron, dtypes
    and a few containers only; any other global is a ``CheckpointError``."""

    def find_class(self, module, name):
        if module in _DCP_MODULES or module.startswith("megatron.core.dist_checkpointing."):
            # Plain data classes of torch DCP / Megatron (e.g. MCoreSavePlan): types, no functions.
            obj = super().find_class(module, name)
            if isinstance(obj, type) or name == "_MEM_FORMAT_ENCODING":
                return obj
        elif (module, name) in _ALLOWED_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None),
                                                 (torch.dtype, torch.layout, torch.memory_format))):
            return super().find_class(module, name)
        raise CheckpointError(
            f"checkpoint metadata references {module}.{name}, which a megatron_lora adapter "
            "checkpoint never contains; refusing to load it (it could run code).")


def check_no_pickled_code(ckpt_dir: str, requested: Optional[set] = None) -> None:
    """Refuse a dist checkpoint whose loading could run code from its files.

    torch DCP unpickles ``.metadata`` and pickled byte items (``requested`` keys only, or all when
    None) without restriction, and megatron-core 0.13 reads ``common.pt`` with
    ``weights_only=False``: ``.metadata`` goes through an allow-list unpickler, requested byte
    items are refused, and ``common.pt`` must load with ``weights_only=True``.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = os.path.join(ckpt_dir, ".metadata")
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise CheckpointError(f"{path} is missing or corrupted ({err}); load an earlier checkpoint.")
    objects = sorted(k for k, v in metadata.state_dict_metadata.items()
                     if isinstance(v, BytesStorageMetadata) and (requested is None or k in requested))
    if objects:
        raise CheckpointError(
            f"{ckpt_dir} holds pickled objects {objects[:4]}, which megatron_lora never writes and "
            "torch would unpickle without restriction; refusing to load it.")
    check_common_state(ckpt_dir)


def allow_megatron_lm_args() -> None:
    """Let ``torch.load(weights_only=True)`` read the ``args`` Megatron-LM keeps in ``common.pt``.

    ``argparse.Namespace`` is plain data; megatron-core registers it (and the enums Megatron-LM's
    args hold) at import with ``add_safe_globals``, which is idempotent, so doing the same here
    changes nothing once megatron.core is imported. Never ``with safe_globals([...])``: on exit
    that context manager unregisters the names it lists, including ones registered before it, and
    every later weights-only load of a Megatron-LM checkpoint (ours, Megatron-LM's own resume)
    then fails with "Unsupported global: GLOBAL argparse.Namespace".
    """
    import argparse

    torch.serialization.add_safe_globals([argparse.Namespace])


def check_common_state(ckpt_dir: str) -> None:
    """Refuse a ``common.pt`` that ``torch.load(weights_only=True)`` cannot read (it could run code)."""
    path = os.path.join(ckpt_dir, "common.pt")
    if not os.path.exists(path):
        return
    allow_megatron_lm_args()
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path} holds objects beyond tensors and plain data ({str(err).splitlines()[-1][:160]}); "
            "refusing to load it, since unpickling it could run code.") from None


def damaged_files(ckpt_dir: str) -> list:
    """Data files of a dist checkpoint that are missing or shorter than its ``.metadata`` says."""
    try:
        with open(os.path.join(ckpt_dir, ".metadata"), "rb") as f:
            storage = getattr(MetadataUnpickler(f).load(), "storage_data", None) or {}
    except (OSError, pickle.UnpicklingError, EOFError, CheckpointError):
        return []
    needed = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    bad = []
    for name, size in sorted(needed.items()):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path) or os.path.getsize(path) < size:
            bad.append(name)
    return bad
