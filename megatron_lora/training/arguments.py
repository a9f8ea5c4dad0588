"""``--lora-*`` command-line flags, generated from ``LoRAConfig`` (its single source of truth).

    pretrain(..., extra_args_provider=add_lora_args)      # Megatron-LM's hook
    cfg = lora_config_from_args(args)                     # None without --lora-rank
    lora_flags(cfg)                                       # the flags that give cfg back

Each ``LoRAConfig`` field ``x_y`` becomes ``--lora-x-y`` with the field's help text; booleans
are switches, tuples take several values. Three flags are not config fields: ``--lora-load`` (a
full adapter to start from), ``--lora-save-merged`` (write a merged base checkpoint) and
``--lora-plus-ratio`` (an optimizer setting: LoRA+, ``core/lora_plus.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Optional

from megatron_lora.core.config import BRANCH_KERNEL_CHOICES, EXPERT_ADAPTER_CHOICES, INIT_METHODS, LoRAConfig


def _flag(name: str) -> str:
    return "--lora-" + name.replace("_", "-")


def add_lora_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the LoRA group to ``parser`` and return it (Megatron's extra_args_provider contract)."""
    group = parser.add_argument_group("LoRA", "Low-rank adapters; nothing changes without --lora-rank.")
    hints = typing.get_type_hints(LoRAConfig)
    for field in dataclasses.fields(LoRAConfig):
        kind, help_text = hints[field.name], field.metadata["help"]
        dest = f"lora_{field.name}"
        if field.name == "rank":  # no default: its presence switches LoRA on
            group.add_argument(_flag("rank"), type=int, default=None, dest=dest, help=help_text)
        elif kind is bool:
            group.add_argument(_flag(field.name), action="store_true", dest=dest, help=help_text)
        elif typing.get_origin(kind) is tuple:
            group.add_argument(_flag(field.name), nargs="+", default=list(field.default), dest=dest,
                               help=f"{help_text} Default: {' '.join(field.default)}.")
        else:
            choices = {"init": INIT_METHODS, "branch_kernels": BRANCH_KERNEL_CHOICES,
                       "expert_adapters": EXPERT_ADAPTER_CHOICES}.get(field.name)
            group.add_argument(_flag(field.name), type=kind, default=field.default, dest=dest,
                               choices=choices, help=f"{help_text} Default: {field.default}.")
    group.add_argument("--lora-load", default=None,
                       help="Full adapter (safetensors) to start from; sliced to this TP layout.")
    group.add_argument("--lora-save-merged", default=None,
                       help="Directory for a merged base checkpoint (plain model, no LoRA).")
    group.add_argument("--lora-plus-ratio", type=float, default=None,
                       help="LoRA+: lora_B (and DoRA magnitudes) learn at this many times --lr, lora_A at "
                            "--lr (core/lora_plus.py). Default: off, one rate.")
    return parser


def lora_config_from_args(args: argparse.Namespace) -> Optional[LoRAConfig]:
    """The ``LoRAConfig`` the flags describe, or None when ``--lora-rank`` was not given."""
    if getattr(args, "lora_rank", None) is None:
        return None
    values = {f.name: getattr(args, f"lora_{f.name}") for f in dataclasses.fields(LoRAConfig)}
    try:
        return LoRAConfig(**values)
    except ValueError as err:  # name the flag, not the dataclass field
        message = str(err)
        for f in dataclasses.fields(LoRAConfig):
            message = message.replace(f"LoRAConfig.{f.name}", _flag(f.name))
        raise ValueError(message) from None


def lora_flags(cfg: LoRAConfig) -> list:
    """The ``--lora-*`` flags that ``lora_config_from_args`` turns back into ``cfg`` (the reverse
    of ``add_lora_args``): rank, alpha and targets always, every other field when not default."""
    hints = typing.get_type_hints(LoRAConfig)
    flags = []
    for field in dataclasses.fields(LoRAConfig):
        value = getattr(cfg, field.name)
        if field.name not in ("rank", "alpha", "target_modules") and value == field.default:
            continue
        if hints[field.name] is bool:
            flags += [_flag(field.name)] if value else []
        elif typing.get_origin(hints[field.name]) is tuple:
            flags += [_flag(field.name), *value]
        elif isinstance(value, float) and value.is_integer():
            flags += [_flag(field.name), int(value)]
        else:
            flags += [_flag(field.name), value]
    return [str(f) for f in flags]
