"""Rank worker of ``test_scale_bytes.py``: the bytes each rank receives in ``export_peft(dst=0)`` and
in ``save_full_adapter`` (the training script's final save), in ``gather_full_adapter()`` (every
rank), ``gather_full_adapter(dst=last rank)`` (TP rank 1 of the last stage) and the logical shapes
of every stage (``_logical_shapes``: the descriptor, the strict load check), the peak bytes of tensors it allocates
meanwhile (``LiveBytes``), and what the rank holds.
"""

import zlib

import torch

LORA = dict(rank=4, alpha=8)


def _random_adapter(model):
    """Random non-zero factors, the same logical tensors at every layout (seeded by the name)."""
    from megatron_lora.core.checkpoint.adapter import _named_factors, load_full_adapter

    full = {}
    for name, (m, factor) in _named_factors(model).items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        full[name] = torch.randn(tuple(m.lora_logical_shape(factor)), generator=g) * 0.05
    load_full_adapter(model, full, strict=False)  # this stage's names only


def gather_factor(m, factor: str) -> torch.Tensor:
    """The reference: one layer's logical factor by a plain all-gather over its TP group, unsharded
    by its declared layout (not the package's point-to-point route)."""
    from megatron_lora.core.collectives import all_gather_list

    return m.lora_layout.unshard(factor, all_gather_list(getattr(m, factor).detach(), m.lora_group))


def bytes_worker(path):
    """{coordinates, what this rank holds, the all-gather reference of its layers, received bytes}."""
    from megatron.core import parallel_state as ps

    from megatron_lora import LoRAConfig, apply_lora
    from megatron_lora.core.checkpoint.adapter import (
        _logical_shapes, _named_factors, gather_full_adapter, save_full_adapter,
    )
    from megatron_lora.hf.export import arch_from_model, export_peft
    from tests.distributed.live_bytes import LiveBytes
    from tests.distributed.models import build_tiny_gpt, tiny_gpt_config
    from tests.distributed.received_bytes import ReceivedBytes

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    model = apply_lora(build_tiny_gpt(tiny_gpt_config(tp=tp, pp=pp)), LoRAConfig(**LORA))
    _random_adapter(model)
    named = _named_factors(model)
    held = {name: dict(logical=m.lora_logical_shape(f), local=tuple(getattr(m, f).shape),
                       sharded=tp > 1 and m.lora_layout.partition_dim(f) is not None,
                       element=getattr(m, f).element_size())
            for name, (m, f) in named.items()}
    reference = {name: gather_factor(m, f).cpu().clone() for name, (m, f) in named.items()}  # all-gather

    out = dict(rank=torch.distributed.get_rank(), tp=ps.get_tensor_model_parallel_rank(),
               pp=ps.get_pipeline_model_parallel_rank(), dp=ps.get_data_parallel_rank(), held=held,
               reference=reference, arch=arch_from_model(model))
    for what, call in (("export_peft", lambda: export_peft(model, dst=0)),
                       ("save", lambda: save_full_adapter(model, path)),
                       ("every_rank", lambda: gather_full_adapter(model)),
                       ("last_rank", lambda: gather_full_adapter(model, dst=torch.distributed.get_world_size() - 1)),
                       ("shapes", lambda: _logical_shapes(model))):
        meter, live = ReceivedBytes(), LiveBytes()
        with meter, live:
            result = call()
        out[what] = dict(total=meter.total, by_op=dict(meter.by_op), object_calls=dict(meter.object_calls),
                         peak=live.peak)
        if what != "save":
            out[what + "_result"] = result
    return out


def non_finite_worker(bad_rank):
    """export_peft's message on this rank when ``bad_rank`` holds a NaN in its first factor."""
    from megatron.core import parallel_state as ps

    from megatron_lora import LoRAConfig, apply_lora
    from megatron_lora.core.checkpoint.adapter import _named_factors
    from megatron_lora.hf.export import export_peft
    from tests.distributed.models import build_tiny_gpt, tiny_gpt_config

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    model = apply_lora(build_tiny_gpt(tiny_gpt_config(tp=tp, pp=pp)), LoRAConfig(**LORA))
    if torch.distributed.get_rank() == bad_rank:
        name, (m, factor) = next(iter(_named_factors(model).items()))
        with torch.no_grad():
            getattr(m, factor).view(-1)[0] = float("nan")
    try:
        export_peft(model, dst=0)
    except ValueError as err:
        return str(err)
    return None
