"""Rank workers of ``test_moe_full_adapter.py``: the full (logical) adapter of a tiny MoE GPT at
expert parallelism > 1 and at expert-TP != TP (docs/design.md §16, the expert pass).

The model: the tiny GPT of ``models.py`` with 4 SequentialMLP experts, top-2, LoRA r=4 on the
attention, both expert linears and the router (replicated: it goes with the dense layers). Its
logical adapter is seeded by global name (``moe_adapter``), so every layout holds the same one.
What a worker returns for the reference is not the package's gather: each rank's local factors,
as stored, with its coordinates; the test puts the shards together by hand.
"""

import zlib

import torch

LORA = dict(rank=4, alpha=8, target_modules=("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "router"))
EXPERTS = 4


def moe_config(tp, ep, etp, pp=1):
    from tests.distributed.models import tiny_gpt_config

    return tiny_gpt_config(tp=tp, pp=pp, sp=tp > 1, num_moe_experts=EXPERTS, moe_router_topk=2,
                           expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                           moe_token_dispatcher_type="alltoall")


def moe_model():
    """This rank's tiny MoE GPT with LoRA, for the layout ``parallel_state`` holds."""
    from megatron.core import parallel_state as ps

    from megatron_lora import LoRAConfig, apply_lora
    from tests.distributed.models import build_tiny_gpt

    cfg = moe_config(ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size(),
                     ps.get_expert_tensor_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    return apply_lora(build_tiny_gpt(cfg), LoRAConfig(**LORA))


def moe_adapter(names_shapes):
    """The logical adapter every layout holds: random, seeded by each tensor's global name."""
    out = {}
    for name, shape in names_shapes.items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        out[name] = torch.randn(tuple(shape), generator=g) * 0.05
    return out


def coordinates():
    from megatron.core import parallel_state as ps

    return dict(rank=torch.distributed.get_rank(), tp=ps.get_tensor_model_parallel_rank(),
                dp=ps.get_data_parallel_rank(), pp=ps.get_pipeline_model_parallel_rank(),
                ep=ps.get_expert_model_parallel_rank(), etp=ps.get_expert_tensor_parallel_rank(),
                edp=ps.get_expert_data_parallel_rank())


def held(model):
    """{name: what this rank holds of it}: its local shard as stored, the layer's TP-group size
    and rank, the split dim, the logical shape, whether it is an expert."""
    from megatron_lora.core import collectives as C
    from megatron_lora.core.checkpoint.adapter import _named_factors

    out = {}
    for name, (m, f) in _named_factors(model).items():
        out[name] = dict(local=getattr(m, f).detach().clone(), logical=tuple(m.lora_logical_shape(f)),
                         dim=m.lora_layout.partition_dim(f), group=C.group_size(m.lora_group),
                         group_rank=C.group_rank(m.lora_group), expert=bool(getattr(m, "is_expert", False)))
    return out


def _metered(call):
    from tests.distributed.received_bytes import ReceivedBytes

    meter = ReceivedBytes()
    with meter:
        result = call()
    return result, dict(total=meter.total, by_op=dict(meter.by_op), object_calls=dict(meter.object_calls))


def full_adapter_worker(save_path, check_paths=(), refusals=False):
    """One layout's run. In order: the logical shapes of every stage and expert rank
    (``_logical_shapes``, metered); each file of ``check_paths`` loaded (strict) and gathered onto
    rank 0; with ``refusals``, the strict load's messages for a full adapter missing one expert and
    for one with an expert the model does not have; the seeded adapter loaded (strict), what each
    rank then holds, and, metered, ``save_full_adapter`` to ``save_path`` (rank 0 writes),
    ``gather_full_adapter()`` on every rank and ``gather_full_adapter(dst=last rank)``."""
    from megatron_lora.core.checkpoint.adapter import (
        _logical_shapes, gather_full_adapter, load_full_adapter, save_full_adapter,
    )
    from megatron_lora.core.checkpoint.errors import CheckpointError

    model = moe_model()
    shapes, shapes_bytes = _metered(lambda: _logical_shapes(model))
    out = dict(coordinates(), shapes=shapes, shapes_bytes=shapes_bytes, checks={})
    for path in check_paths:
        load_full_adapter(model, path)
        out["checks"][path] = gather_full_adapter(model, dst=0)
    seeded = moe_adapter(shapes)
    if refusals:
        out["refusals"] = []
        missing = dict(seeded)
        del missing["decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.lora_A"]
        unknown = dict(seeded, **{"decoder.layers.1.mlp.experts.local_experts.4.linear_fc2.lora_A":
                                  seeded["decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.lora_A"]})
        for bad in (missing, unknown):
            try:
                load_full_adapter(model, bad)
            except CheckpointError as err:
                out["refusals"].append(str(err))
            else:
                out["refusals"].append(None)
    load_full_adapter(model, seeded)
    out["held"] = held(model)
    last = torch.distributed.get_world_size() - 1
    for what, call in (("save", lambda: save_full_adapter(model, save_path)),
                       ("every_rank", lambda: gather_full_adapter(model)),
                       ("last_rank", lambda: gather_full_adapter(model, dst=last))):
        result, out[what] = _metered(call)
        out[what + "_result"] = result
    return out
