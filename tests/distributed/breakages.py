"""Deliberately broken variants, one invariant each, applied inside a spawned rank.

The harness tests run the normal oracles with one of these patched in and assert that the oracle
FAILS: a harness that passes a broken implementation proves nothing.

Each breakage is a context manager that patches the library on enter and restores it on exit.
A worker takes one as an argument (``breakage=breakages.no_rider_sum``; module-level functions
pickle by reference into the ranks) and runs ``with breakage():``; ``contextlib.nullcontext``
is the unbroken case.
"""

import contextlib
import math

import torch

from megatron_lora.core import collectives, init, inject, layers


@contextlib.contextmanager
def _patched(*replacements):
    """Set each ``(module, attribute, value)`` for the duration of the block, then restore."""
    originals = [(module, name, getattr(module, name)) for module, name, _ in replacements]
    try:
        for module, name, value in replacements:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in originals:
            setattr(module, name, value)


@contextlib.contextmanager
def no_rider_sum():
    """Reduce the base message but leave the replicated factor's rank-r term unsummed."""

    def broken(main, rider, group, mode, tail=None):
        if mode == "reduce_scatter":
            main = collectives.reduce_scatter_first_dim(main, group)
            chunk = main.shape[0]
            rider = rider.narrow(0, collectives.group_rank(group) * chunk, chunk)
        elif mode == "all_reduce":
            main = collectives.all_reduce(main.clone(), group)
        return main, rider, tail

    with _patched((collectives, "reduce_with_rider", broken)):
        yield


@contextlib.contextmanager
def dora_norm_own_all_reduce():
    """DoRA's row-layer norm takes its own all-reduce instead of riding in the base message
    (correct numbers, one collective more per row layer and forward: only a count catches it)."""
    original = collectives.reduce_with_rider

    def broken(main, rider, group, mode, tail=None):
        main, rider, _ = original(main, rider, group, mode)
        if tail is not None:
            tail = collectives.all_reduce(tail.clone(), group)
        return main, rider, tail

    with _patched((collectives, "reduce_with_rider", broken)):
        yield


@contextlib.contextmanager
def shard_fan_in_init():
    """Initialise each rank's own shard of A from the SHARD's fan-in with a per-rank stream."""

    @torch.no_grad()
    def broken(layer, name):
        a = layer.lora_A
        gen = torch.Generator().manual_seed(init.name_seed(layer.lora_config.seed, name))
        bound = 1.0 / math.sqrt(a.shape[1])  # in/t for row layers: the docs/design.md §10, trap 1 bug
        for _ in range(collectives.group_rank(layer.tp_group) + 1):
            full = torch.empty(a.shape).uniform_(-bound, bound, generator=gen)
        a.copy_(full)
        layer.lora_B.zero_()
        layer.lora_init_name = name

    with _patched((layers, "init_lora_factors", broken), (inject, "init_lora_factors", broken)):
        yield
