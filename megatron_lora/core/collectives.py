"""Every collective the LoRA layers issue, in one place, so a reader can count them.

Layers never call ``torch.distributed`` directly. Per forward / backward of one layer:

| layer, mode                  | forward                         | backward                         |
|------------------------------|---------------------------------|----------------------------------|
| column, TP>1, no SP          | none                            | 1 all-reduce of ``[dX | dY_i B_i]``  |
| column, SP                   | 1 all-gather of X (as base)     | 1 reduce-scatter of ``[dX | dY_i B_i]`` |
| row, TP>1, no SP             | 1 all-reduce of ``[Y | X_i A_i^T]`` | none                         |
| row, SP                      | 1 reduce-scatter of ``[Y | X_i A_i^T]`` | 1 all-gather of dY (as base) |

That is exactly the base layer's count: the rank-r term the replicated factor's gradient needs
rides in the base layer's own message (docs/design.md §3), and so do a DoRA row layer's partial
weight norms (the ``tail``, §18). Expert layers with explicit expert
communication issue no TP collective of their own: the token dispatcher all-gathers their input
and reduce-scatters their output over the expert-TP group, as sequence parallelism does. There,
under SP with the expert-TP group equal to the TP group (Megatron's default), the layer issues
nothing either (mode ``"partial"``): the replicated factor's gradient is a per-rank partial sum,
marked ``sequence_parallel`` like an SP norm weight and summed by ``finalize_model_grads``. The
one exception left is a layer whose caller reduces although no per-step sum over its group exists
(``disable_grad_reduce``, an expert-TP group that is not the TP group, expert-TP > 1 without SP):
the rank-r term gets its own small all-reduce (mode ``"rider_only"``). The tests count what a
layer issues with ``tests/collective_count.py``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group, in place; every rank receives the same bits."""
    if group_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


def all_gather_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the ranks' tensors along dim 0 (the sequence dim in Megatron's [s, b, h])."""
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    out = torch.empty((x.shape[0] * world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def all_gather_list(x: torch.Tensor, group) -> list:
    """Every rank's ``x``, in group-rank order (``[x]`` alone in a one-rank group)."""
    world = group_size(group)
    if world == 1:
        return [x]
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous(), group=group)
    return shards


def reduce_scatter_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group, each rank keeping its chunk of dim 0."""
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[0] % world:
        raise ValueError(
            f"sequence-parallel reduce-scatter needs dim 0 ({x.shape[0]}) divisible by the "
            f"TP size {world}; make --seq-length a multiple of the TP size."
        )
    x = x.contiguous()
    out = torch.empty((x.shape[0] // world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x, group=group)
    return out


COMM_MODES = ("all_reduce", "reduce_scatter", "partial", "rider_only", "none")


def comm_mode(tp_size: int, sequence_parallel: bool, base_reduces: bool = True,
              partial_grads_summed: bool = False) -> str:
    """How a LoRA layer's one collective runs, read off what its base layer does (one of COMM_MODES).

    ``sequence_parallel``: the base gathers its input / reduce-scatters its output along the
    sequence. ``base_reduces``: the base layer issues its TP reduction itself; False for expert
    layers with explicit expert communication and for ``disable_grad_reduce``, where the caller
    reduces the base part. Then ``partial_grads_summed`` (a per-step sum of the replicated
    factor's gradient over the layer's group exists: ``finalize_model_grads``' SP sum) gives
    ``"partial"``, no collective at all; else the rank-r rider gets its own small all-reduce
    (``"rider_only"``).
    """
    if tp_size == 1:
        return "none"
    if sequence_parallel:
        return "reduce_scatter"
    if base_reduces:
        return "all_reduce"
    return "partial" if partial_grads_summed else "rider_only"


def reduce_with_rider(main: torch.Tensor, rider: torch.Tensor, group, mode: str,
                      tail: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The base layer's ONE collective over ``[main | rider]`` (and ``tail``), split afterwards.

    ``mode`` (see ``comm_mode``): ``"all_reduce"``; ``"reduce_scatter"`` along dim 0 (sequence
    parallel); ``"rider_only"``: the caller reduces ``main``, the rank-r rider gets its own small
    all-reduce; ``"partial"``: the caller reduces ``main`` and the rider stays this rank's term
    (the factor gradient made from it is summed per step); ``"none"`` at TP = 1. The rider is the rank-r activation whose TP sum completes
    the gradient of a replicated LoRA factor; it costs ``r / hidden`` more bytes and no extra
    message (docs/design.md §3).

    ``tail``: a vector every rank needs the WHOLE group sum of (DoRA's partial squared weight norms
    of a row layer, docs/design.md §18), appended to the same message: once to an all-reduce, t
    copies to a reduce-scatter (one at the end of each rank's chunk). Only with ``"all_reduce"``,
    ``"reduce_scatter"`` or ``"none"``. Returns ``(main, rider, tail)`` reduced (tail None if not given).
    """
    if tail is not None and mode not in ("all_reduce", "reduce_scatter", "none"):
        raise ValueError(f"a tail rides only in the layer's own reduction; mode {mode!r} has none.")
    if mode in ("none", "partial"):
        return main, rider, tail
    if mode == "rider_only":
        return main, all_reduce(rider.clone(), group), None
    if tail is not None:
        return _reduce_with_tail(main, rider, tail, group, mode)
    message = reduce(torch.cat([main, rider.to(main.dtype)], dim=-1), group, mode)
    main, rider = message.split([main.shape[-1], rider.shape[-1]], dim=-1)
    return main, rider, None


def _reduce_with_tail(main, rider, tail, group, mode):
    """``reduce_with_rider`` with a tail: the message is ``[copies, body | tail]`` flat, where body is
    one rank's chunk of ``[main | rider]`` (the whole tensor when all-reducing, copies = 1)."""
    copies = group_size(group) if mode == "reduce_scatter" else 1
    if main.shape[0] % copies:
        raise ValueError(
            f"sequence-parallel reduce-scatter needs dim 0 ({main.shape[0]}) divisible by the "
            f"TP size {copies}; make --seq-length a multiple of the TP size.")
    width, r = main.shape[-1], rider.shape[-1]
    chunk = (main.shape[0] // copies,) + tuple(main.shape[1:-1])
    body_numel = math.prod(chunk) * (width + r)
    message = main.new_empty(copies, body_numel + tail.numel())
    body = message[:, :body_numel].view(copies, *chunk, width + r)
    body[..., :width].copy_(main.reshape(copies, *chunk, width))
    body[..., width:].copy_(rider.reshape(copies, *chunk, r))
    message[:, body_numel:].copy_(tail)
    out = reduce(message, group, mode)[0]  # this rank's row: its chunk and the whole tail sum
    main, rider = out[:body_numel].view(*chunk, width + r).split([width, r], dim=-1)
    return main, rider, out[body_numel:]


def reduce(x: torch.Tensor, group, mode: str) -> torch.Tensor:
    """One tensor through the base layer's collective: ``"all_reduce"``, ``"reduce_scatter"``
    along dim 0, or nothing (``"none"``: TP = 1; ``"rider_only"`` / ``"partial"``: the caller
    reduces it)."""
    if mode in ("none", "rider_only", "partial"):
        return x
    if mode == "reduce_scatter":
        return reduce_scatter_first_dim(x, group)
    if mode == "all_reduce":
        return all_reduce(x, group)
    raise ValueError(f"unknown communication mode {mode!r}; expected one of {COMM_MODES}")


def broadcast_from_group_source(x: torch.Tensor, group) -> None:
    """In place: every rank of the group receives group rank 0's tensor."""
    if group_size(group) > 1:
        dist.broadcast(x, group=group, group_src=0)


def scatter_from_group_source(out: torch.Tensor, chunks: Optional[list], group) -> None:
    """In place: rank i of the group receives ``chunks[i]``; only group rank 0 passes chunks."""
    if group_size(group) == 1:
        out.copy_(chunks[0])
        return
    dist.scatter(out, [c.contiguous() for c in chunks] if chunks else None, group=group, group_src=0)
