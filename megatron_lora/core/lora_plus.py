"""LoRA+ (Hayou, Ghosh and Yu 2024): B learns ``ratio`` times faster than A.

Why B: at init B = 0 and A is random, so with one learning rate the update of B is what limits
how fast the adapter moves; a larger rate for B (the paper suggests ratios around 16) trains
faster at the same cost. The rule is the one of PEFT's ``create_loraplus_optimizer``, so a run
moved between the two steps the same parameters at the same rates: every ``lora_B`` and every
one-dimensional adapter parameter (DoRA's magnitude) take ``ratio * lr``; the other adapter
parameters (``lora_A``) take ``lr``.

Two consumers of that one rule (:func:`takes_plus_rate`):

* :func:`lora_plus_param_groups`: torch optimizer parameter groups, for a custom loop;
* :func:`megatron_optimizer_kwargs`: the keyword arguments that make Megatron-Core's
  ``get_megatron_optimizer`` (and its ``OptimizerParamScheduler``) give those parameters
  ``ratio`` times the scheduled rate at every step, warmup and decay included.
"""

from __future__ import annotations

import inspect
from typing import Dict, List

import torch

from megatron_lora.core.layers import is_lora_key


def takes_plus_rate(name: str, param: torch.nn.Parameter) -> bool:
    """Whether the parameter ``name`` steps at ``ratio * lr`` (module docstring)."""
    return is_lora_key(name) and (name.rsplit(".", 1)[-1] == "lora_B" or param.dim() == 1)


def check_ratio(ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not ratio > 0:
        raise ValueError(f"LoRA+ ratio must be a positive number (B's learning rate / A's; 16 is the "
                         f"paper's suggestion, 1 is plain LoRA), got {ratio!r}.")


def lora_plus_param_groups(model, lr: float, ratio: float, weight_decay: float = 0.0) -> List[Dict]:
    """Parameter groups for ``torch.optim.AdamW(groups)`` and the like: the model's trainable
    parameters, ``lr`` for A and ``ratio * lr`` for B (and DoRA magnitudes), each group with
    ``weight_decay``. ``model``: a module or a list of model chunks; a parameter shared by several
    modules (one adapter for all experts) is listed once. Refuses trainable parameters that are
    not adapter parameters, since their rate would be a guess."""
    check_ratio(ratio)
    chunks = model if isinstance(model, (list, tuple)) else [model]
    slow, fast, seen = [], [], set()
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            if not is_lora_key(name):
                raise ValueError(f"{name} is trainable but not an adapter parameter; LoRA+ sets rates for "
                                 "adapters only. Freeze it (apply_lora does) or build its group yourself.")
            seen.add(id(param))
            (fast if takes_plus_rate(name, param) else slow).append(param)
    if not fast:
        raise ValueError("the model has no trainable lora_B: apply_lora(model, cfg) before building the optimizer.")
    return [dict(params=slow, lr=lr, weight_decay=weight_decay),
            dict(params=fast, lr=lr * ratio, weight_decay=weight_decay)]


def megatron_optimizer_kwargs(config, ratio: float) -> dict:
    """Keyword arguments for ``get_megatron_optimizer(config, chunks, **kwargs)``.

    Releases with ``config_overrides`` (0.16 and later): Megatron's standard overrides (no weight
    decay on biases and 1-D parameters) plus ``max_lr`` / ``min_lr`` times ``ratio`` for B, which
    the scheduler reads per group, so warmup from 0 and every decay style scale exactly (and
    ``lr_mult``, which tells the groups apart when a checkpoint is loaded). Older
    releases (0.13): ``scale_lr_cond`` with ``lr_mult=ratio``, which the scheduler multiplies in."""
    from megatron.core.optimizer import get_megatron_optimizer

    check_ratio(ratio)
    if "config_overrides" not in inspect.signature(get_megatron_optimizer).parameters:
        return dict(scale_lr_cond=takes_plus_rate, lr_mult=float(ratio))
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    overrides = get_standard_config_overrides(config=config)
    key = ParamKey(with_name_predicate=ParamWithNamePredicate(name="lora_plus_B",
                                                              fn=lambda p, n: takes_plus_rate(n, p)))
    # lr_mult: these releases' scheduler ignores it, but it is one of the keys that match saved
    # parameter groups to the optimizer's on load; without it A's and B's groups look alike and a
    # resumed run gives both one group's rates (0.16.1 did: caught by the resume test).
    overrides[key] = {"max_lr": config.lr * ratio, "min_lr": config.min_lr * ratio, "lr_mult": float(ratio)}
    return dict(config_overrides=overrides)
