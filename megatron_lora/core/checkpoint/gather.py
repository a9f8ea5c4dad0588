"""The logical (TP=1) adapter on one rank, in bytes that do not grow with the world size
(docs/design.md §16).

Only the data-parallel replica that holds ``dst`` takes part (``dst``'s model-parallel group,
TP x PP ranks); the other replicas hold the same factors and send and receive nothing. In each
pipeline stage the *collector* is the stage's rank on ``dst``'s pipeline group (the rank with
``dst``'s TP rank). Per layer, the stage's TP ranks gather the layer's sharded factor onto the
collector; a replicated factor is the collector's own copy and travels nowhere. The collector
sends each logical tensor point-to-point over the pipeline group to ``dst``, after one header
that describes its stage's tensors (names as UTF-8 bytes, dtype and shape as int64). Every
message is a tensor: nothing is pickled, no ``*_object`` collective runs.

    rank                              receives (t = TP size, its stage's factors)
    dst                               the adapter once, minus the shards it holds, plus headers
    a collector of another stage      (t-1)/t of its stage's sharded factors, plus 8 bytes
    another rank of dst's replica     8 bytes (dst's TP rank)
    a rank of another replica         nothing

Expert layers (MoE) take a second pass where expert parallelism is > 1 or the expert-TP group is
not the TP group: ``dst``'s dense replica then does not hold every expert. Megatron lays the
experts out as expert-TP x EP x PP within one expert-data-parallel rank, so the pass runs over
``dst``'s expert group (``get_expert_tensor_model_pipeline_parallel_group``) the same way: one
8-byte broadcast of ``dst``'s expert-TP rank names the collectors (one per EP rank and stage),
each layer is gathered over its expert-TP group onto the collector, and the collector sends a
header and the logical tensors to ``dst``. The ranks of other expert-DP replicas take no part.

    rank                                 receives in the expert pass (e = expert-TP size)
    dst                                  every expert once, minus the shards it holds, plus headers
    a collector of another position      (e-1)/e of its position's sharded expert factors, plus 8 bytes
    another rank of dst's expert group   8 bytes (dst's expert-TP rank)
    a rank of another expert replica     nothing

``dst=None`` (every rank) gathers onto rank 0 so, then broadcasts the result: each rank
receives the adapter once, which is what it asked for. The same headers carry every stage's
names and shapes to every rank (``every_stage``), and ``first_message`` agrees on an error with
one int64 all-reduce: metadata moves as tensors too.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_lora.core import collectives as C
from megatron_lora.core.checkpoint.errors import CheckpointError

# The dtypes a header can name, by index; LoRA factors are floating point (check_finite_float).
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
Meta = List[Tuple[str, torch.dtype, Tuple[int, ...]]]  # (name, dtype, logical shape) per tensor


def transport_device(group=None) -> torch.device:
    """Where messages over ``group`` live: the current CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_adapter(named: Dict[str, tuple], dst: Optional[int]) -> Optional[Dict[str, torch.Tensor]]:
    """{name: logical tensor on the CPU} on global rank ``dst`` (every rank with None), None elsewhere.

    ``named``: this rank's ``{name: (LoRA module, factor)}``. Collective over all ranks (the
    ranks outside ``dst``'s replica return at once). A tensor may be the parameter itself (a
    replicated factor, or TP = 1 on the CPU): read it, do not write it.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {name: _logical(m, f, 0, True).cpu().contiguous() for name, (m, f) in named.items()}
    if dst is None:
        return _broadcast(gather_adapter(named, 0), src=0)
    dense, experts = _split_experts(named)
    out = _gather(dense, dst, _Route(dst))
    if experts is not None:
        got = _gather(experts, dst, _ExpertRoute(dst))
        if out is not None:
            out.update(got)
    return out


def _gather(named: Dict[str, tuple], dst: int, route) -> Optional[Dict[str, torch.Tensor]]:
    """One pass: the layers of ``named`` gathered over their TP groups onto the route's
    collectors, each of which sends a header and the logical tensors to ``dst``."""
    if not route.takes_part:
        return None
    me = dist.get_rank()
    if me != dst:
        if route.collects:
            _send_tensors(_encode(_meta(named)), dst, route.group)
        for m, f in named.values():  # one logical tensor alive at a time: peak 2T (§16)
            if route.collects:
                dist.send(_logical(m, f, route.collector, True).contiguous().to(route.device), dst, group=route.group)
            else:
                _logical(m, f, route.collector, False)
        return None
    out = {}
    for src in route.sources:  # dense: stage order; experts: (EP rank, stage) order
        if src == me:
            out.update({name: _logical(m, f, route.collector, True).cpu().contiguous()
                        for name, (m, f) in named.items()})
            continue
        for name, dtype, shape in _decode(*_recv_tensors(src, route.group, route.device)):
            buf = torch.empty(shape, dtype=dtype, device=route.device)
            dist.recv(buf, src, group=route.group)
            out[name] = buf.cpu()
    return out


def _is_expert(m) -> bool:
    return bool(getattr(m, "is_expert", False))


def expert_pass_needed() -> bool:
    """Whether expert layers need their own pass: with expert parallelism, or an expert-TP group
    that is not the TP group, ``dst``'s dense replica does not hold every expert, sharded the way
    the dense pass gathers. The answer depends on the layout only, so every rank agrees."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return False
    if ps.get_expert_model_parallel_world_size() > 1:
        return True
    return (dist.get_process_group_ranks(ps.get_expert_tensor_parallel_group())
            != dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()))


def _split_experts(named: Dict[str, tuple]) -> Tuple[Dict[str, tuple], Optional[Dict[str, tuple]]]:
    """(dense layers, expert layers), or (all layers, None) when experts need no pass of their own."""
    if not expert_pass_needed():
        return named, None
    dense = {n: v for n, v in named.items() if not _is_expert(v[0])}
    return dense, {n: v for n, v in named.items() if _is_expert(v[0])}


class _Route:
    """Who takes part and who collects, from Megatron's parallel state and one 8-byte broadcast.

    ``group`` carries the point-to-point messages to ``dst``, ``sources`` are the ranks ``dst``
    receives from in order (itself included), ``collector`` is the collectors' rank in each
    layer's TP group."""

    def __init__(self, dst: int):
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            raise CheckpointError(
                f"gathering the adapter over {dist.get_world_size()} ranks needs Megatron's parallel state "
                "(parallel_state.initialize_model_parallel), which is not set up; set it up first.")
        mp_group = ps.get_model_parallel_group()
        self.takes_part = dst in dist.get_process_group_ranks(mp_group)
        if not self.takes_part:
            return
        self.group = ps.get_pipeline_model_parallel_group()
        self.sources = dist.get_process_group_ranks(self.group)
        self.device = transport_device(self.group)
        tp_rank = ps.get_tensor_model_parallel_rank()
        # The collectors are the ranks with dst's TP rank; only dst knows it: 8 bytes to the replica.
        self.collector = _broadcast_rank(tp_rank, dst, mp_group)
        self.collects = dst in self.sources
        if self.collects != (tp_rank == self.collector):
            raise CheckpointError(
                f"rank {dist.get_rank()} (TP rank {tp_rank}) is {'' if self.collects else 'not '}on the pipeline "
                f"group of rank {dst} (TP rank {self.collector}): expected Megatron's layout, where a pipeline "
                "group joins the ranks of one TP rank. Gather with dst=None instead.")


class _ExpertRoute:
    """The route of the expert pass: ``dst``'s expert group (Megatron's expert tensor-model-
    pipeline group: the ETP x EP x PP ranks of ``dst``'s expert-data-parallel rank) holds every
    expert once. Its collectors are the ranks with ``dst``'s expert-TP rank (one 8-byte broadcast
    over the group), one per (EP rank, stage); the other expert-DP replicas take no part."""

    def __init__(self, dst: int):
        from megatron.core import parallel_state as ps

        group = ps.get_expert_tensor_model_pipeline_parallel_group()
        ranks = dist.get_process_group_ranks(group)
        self.takes_part = dst in ranks
        if not self.takes_part:
            return
        self.group, self.device = group, transport_device(group)
        etp = _expert_tp_blocks(ranks)
        self.collector = _broadcast_rank(ps.get_expert_tensor_parallel_rank(), dst, group)
        self.sources = ranks[self.collector::etp]
        self.collects = dist.get_rank() in self.sources


def _expert_tp_blocks(ranks: List[int]) -> int:
    """The expert-TP size, after checking Megatron's layout of the expert group ``ranks``: its
    expert-TP groups are consecutive blocks, in expert-TP rank order (expert-TP varies fastest).
    ``dst`` relies on it to name the collectors without asking for anyone's coordinates."""
    from megatron.core import parallel_state as ps

    etp_ranks = dist.get_process_group_ranks(ps.get_expert_tensor_parallel_group())
    etp, me = len(etp_ranks), ranks.index(dist.get_rank())
    block = ranks[me - me % etp: me - me % etp + etp]
    if block != etp_ranks or etp_ranks.index(dist.get_rank()) != ps.get_expert_tensor_parallel_rank():
        raise CheckpointError(
            f"rank {dist.get_rank()}: its expert-TP group {etp_ranks} is not the block {block} of its expert "
            f"tensor-model-pipeline group {ranks}: expected Megatron's layout, where expert-TP varies fastest. "
            "Gather at EP=1 instead (convert the dist checkpoint).")
    return etp


def _broadcast_rank(rank: int, dst: int, group) -> int:
    """``dst``'s ``rank`` (its index in some group) on every rank of ``group``: 8 bytes."""
    value = torch.tensor([rank], dtype=torch.int64, device=transport_device(group))
    if C.group_size(group) > 1:
        dist.broadcast(value, src=dst, group=group)
    return int(value.item())


def _logical(m, factor: str, collector_tp: int, collects: bool) -> Optional[torch.Tensor]:
    """One factor in its logical form on the collector (None elsewhere): a sharded factor is
    gathered over the layer's TP group; a replicated one is the collector's own copy."""
    local = getattr(m, factor).detach()
    group = m.lora_group
    world = C.group_size(group)
    if world == 1 or m.lora_layout.partition_dim(factor) is None:
        return m.lora_layout.unshard(factor, [local]) if collects else None
    shards = [torch.empty_like(local) for _ in range(world)] if collects else None
    dist.gather(local.contiguous(), shards, dst=dist.get_process_group_ranks(group)[collector_tp], group=group)
    return m.lora_layout.unshard(factor, shards) if collects else None


def _meta(named: Dict[str, tuple]) -> Meta:
    """(name, dtype, logical shape) of this rank's tensors, from the layers' declared layout."""
    return [(name, getattr(m, f).dtype, tuple(m.lora_logical_shape(f))) for name, (m, f) in named.items()]


# ------------------------------------------------------------------ headers: metadata as tensors

def _encode(meta: Meta) -> List[torch.Tensor]:
    """[sizes, names, table]: int64 [2] (the lengths of the other two), uint8 UTF-8 names joined
    by NUL bytes, int64 (dtype index, ndim, *shape) per tensor."""
    table = []
    for name, dtype, shape in meta:
        if dtype not in _DTYPES:
            raise CheckpointError(f"{name} has dtype {dtype}; LoRA factors are one of {list(_DTYPES)}.")
        table += [_DTYPES.index(dtype), len(shape), *shape]
    names = torch.tensor(list("\0".join(name for name, _, _ in meta).encode()), dtype=torch.uint8)
    table = torch.tensor(table, dtype=torch.int64)
    return [torch.tensor([names.numel(), table.numel()], dtype=torch.int64), names, table]


def _decode(sizes: torch.Tensor, names: torch.Tensor, table: torch.Tensor) -> Meta:
    del sizes
    words = bytes(names.cpu().tolist()).decode().split("\0") if names.numel() else []
    values, out, i = table.cpu().tolist(), [], 0
    for name in words:
        ndim = values[i + 1]
        out.append((name, _DTYPES[values[i]], tuple(values[i + 2:i + 2 + ndim])))
        i += 2 + ndim
    return out


def _send_tensors(header: List[torch.Tensor], dst: int, group) -> None:
    device = transport_device(group)
    for t in header:
        if t.numel():
            dist.send(t.to(device), dst, group=group)


def _recv_tensors(src: int, group, device) -> List[torch.Tensor]:
    sizes = torch.empty(2, dtype=torch.int64, device=device)
    dist.recv(sizes, src, group=group)
    out = [sizes]
    for n, dtype in zip(sizes.tolist(), (torch.uint8, torch.int64)):
        t = torch.empty(n, dtype=dtype, device=device)
        if n:
            dist.recv(t, src, group=group)
        out.append(t)
    return out


def _broadcast_header(header: Optional[List[torch.Tensor]], src: int, device, group=None) -> List[torch.Tensor]:
    sizes = header[0].to(device) if header else torch.empty(2, dtype=torch.int64, device=device)
    dist.broadcast(sizes, src=src, group=group)
    out = [sizes]
    for i, (n, dtype) in enumerate(zip(sizes.tolist(), (torch.uint8, torch.int64)), start=1):
        t = header[i].to(device) if header else torch.empty(n, dtype=dtype, device=device)
        if n:
            dist.broadcast(t, src=src, group=group)
        out.append(t)
    return out


def every_stage(named: Dict[str, tuple]) -> Meta:
    """(name, dtype, logical shape) of every LoRA tensor of the whole model, on every rank.

    Each pipeline stage broadcasts its header over the pipeline group (TP ranks and replicas hold
    the same names): a rank receives the other stages' headers once, whatever TP and DP are.
    Expert layers, where they need a pass of their own (expert parallelism, or an expert-TP group
    that is not the TP group), are listed by the expert group instead: each (EP rank, stage)
    broadcasts its experts' header from its first expert-TP rank, so every rank learns the experts
    of every expert rank. Without Megatron's parallel state every rank of the world is a stage.
    """
    from megatron.core import parallel_state as ps

    mine = _meta(named)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    if not ps.model_parallel_is_initialized():
        return _headers(mine, range(dist.get_world_size()), None)
    dense, experts = _split_experts(named)
    group = ps.get_pipeline_model_parallel_group()
    out = _headers(_meta(dense), dist.get_process_group_ranks(group), group)
    if experts is not None:
        group = ps.get_expert_tensor_model_pipeline_parallel_group()
        ranks = dist.get_process_group_ranks(group)
        out += _headers(_meta(experts), ranks[::_expert_tp_blocks(ranks)], group)
    return out


def _headers(mine: Meta, sources, group) -> Meta:
    """Every source's header, broadcast over ``group`` in turn (this rank's ``mine`` when it is one)."""
    device, me, out = transport_device(group), dist.get_rank(), []
    for src in sources:
        out += _decode(*_broadcast_header(_encode(mine) if src == me else None, src, device, group))
    return out


def _broadcast(full: Optional[Dict[str, torch.Tensor]], src: int) -> Dict[str, torch.Tensor]:
    """``src``'s {name: tensor} on every rank: one header, then one broadcast per tensor."""
    device = transport_device()
    mine = dist.get_rank() == src
    meta = _decode(*_broadcast_header(_encode([(n, t.dtype, tuple(t.shape)) for n, t in full.items()])
                                      if mine else None, src, device))
    if mine:
        for name, _, _ in meta:
            dist.broadcast(full[name].to(device), src=src)
        return full
    out = {}
    for name, dtype, shape in meta:
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(buf, src=src)
        out[name] = buf.cpu()
    return out


def first_message(message: Optional[str]) -> Optional[str]:
    """The ``message`` of the lowest rank that has one, on every rank (None if no rank has):
    one int64 all-reduce, and the message's bytes only when there is one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return message
    device, world = transport_device(), dist.get_world_size()
    first = torch.tensor([dist.get_rank() if message is not None else world], dtype=torch.int64, device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    src = int(first.item())
    if src == world:
        return None
    header = _encode([(message, torch.float32, ())]) if dist.get_rank() == src else None
    meta = _decode(*_broadcast_header(header, src, device))
    return meta[0][0] if meta else ""
