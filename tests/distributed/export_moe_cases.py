"""Rank workers of ``test_export_moe.py``: the in-memory exports of a Qwen3-MoE LoRA model at
expert-parallel layouts, and the file conversions they must equal. Kept apart from the test
module so that ranks do not import transformers / peft.

The model is ``hf-to-megatron``'s conversion of a tiny random transformers Qwen3-MoE (q/k norms,
4 experts, top-2), built the way ``pretrain_gpt_lora.py`` builds it from its ``model_flags.txt``,
with LoRA r=4 on attention, both expert linears and the router, and random non-zero B's drawn
for the logical adapter (the same at every layout).
"""

import json
import os

import torch
import torch.distributed as dist

from tests.distributed import family_cases as F
from tests.distributed.export_cases import _parameters, _pipeline_logits, _randomize_lora_b

LAYOUTS = {  # world = TP x PP x dense DP = ETP x EP x PP x expert DP
    "ep2": dict(world=2, tp=1, ep=2, etp=1),
    "ep4": dict(world=4, tp=1, ep=4, etp=1),
    "tp2_sp_etp2_ep2": dict(world=4, tp=2, sp=True, ep=2, etp=2),
    "etp2_ep2": dict(world=4, tp=1, ep=2, etp=2),
    "pp2_ep2": dict(world=4, tp=1, pp=2, ep=2, etp=1),
    "tp2_sp_etp1": dict(world=2, tp=2, sp=True, ep=1, etp=1),  # experts whole on every rank: no expert traffic
}
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "router")


def lora_config():
    from megatron_lora import LoRAConfig

    return LoRAConfig(rank=4, alpha=8, seed=3, target_modules=TARGETS)


def coordinates():
    from megatron.core import parallel_state as ps

    return dict(rank=dist.get_rank(), tp=ps.get_tensor_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_rank(),
                dp=ps.get_data_parallel_rank(), ep=ps.get_expert_model_parallel_rank(),
                etp=ps.get_expert_tensor_parallel_rank(), edp=ps.get_expert_data_parallel_rank())


def _metered(call):
    from tests.distributed.received_bytes import ReceivedBytes

    with ReceivedBytes() as meter:
        result = call()
    return result, dict(meter.by_op, objects=sum(meter.object_calls.values()))


def lora_model(paths, layout, dtype="float32"):
    """This rank's stage of the converted Qwen3-MoE at ``layout``, its parameters in ``dtype``,
    with LoRA and random non-zero B's."""
    from megatron_lora import apply_lora
    from megatron_lora.training.loop import gpt_stage_from_args
    from megatron_lora.training.model_checkpoint import load_model

    lay = LAYOUTS[layout]
    args = F.script_args(paths, "mg_base", lay, ["--expert-tensor-parallel-size", lay["etp"],
                                                 "--pipeline-model-parallel-size", lay.get("pp", 1),
                                                 *(["--bf16"] if dtype == "bfloat16" else [])])
    lora = lora_config()
    model = gpt_stage_from_args(args, lora)
    load_model(model, paths["mg_base"])
    apply_lora(model, lora)
    _randomize_lora_b(model)
    return model


def export_worker(paths, layout, save_path):
    """LoRA on the converted base at ``layout``; every export (fp32 / bf16, dst 0 / None / last,
    PEFT fused / per-expert), the bytes two merged exports receive, this rank's base shards, the
    logits, and the full adapter saved to ``save_path`` for the file conversions."""
    from megatron_lora.core.checkpoint.adapter import save_full_adapter
    from megatron_lora.hf.export import export_merged, export_peft

    lay = LAYOUTS[layout]
    model = lora_model(paths, layout)
    before = _parameters(model)
    hf_config = json.load(open(os.path.join(paths["hf_model"], "config.json")))
    last = dist.get_world_size() - 1
    out = dict(
        coordinates(),
        merged=dict(export_merged(model, hf_config, dtype=torch.float32, dst=0)),
        merged_every_rank=dict(export_merged(model, dtype=torch.float32, dst=None)),
        merged_on_last=dict(export_merged(model, dtype=torch.float32, dst=last)),
        peft_fused=export_peft(model, hf_config, dst=0),
        peft_per_expert=export_peft(model, dst=0, expert_layout="per_expert"),
        peft_every_rank=export_peft(model, dst=None, expert_layout="per_expert"))
    out["merged_bf16"], out["received"] = _metered(lambda: dict(export_merged(model, dtype=torch.bfloat16, dst=0)))
    out["merged_bf16_every_rank"], out["received_every_rank"] = _metered(
        lambda: dict(export_merged(model, dtype=torch.bfloat16, dst=None)))
    base = {name: p for name, p in model.named_parameters() if not name.endswith(("lora_A", "lora_B"))}
    out["own_bf16"] = sum(2 * p.numel() for p in base.values())  # this rank's base shards in bf16
    out["own_expert_bf16"] = sum(2 * p.numel() for name, p in base.items() if ".experts." in name)
    out["own_dense_sharded_bf16"] = sum(2 * p.numel() for name, p in base.items() if ".experts." not in name
                                        and getattr(p, "tensor_model_parallel", False) and lay["tp"] > 1)
    after = _parameters(model)
    out["unchanged"] = sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    out["logits"] = _pipeline_logits(model)
    save_full_adapter(model, save_path)
    return out


def offline_worker(paths, adapter):
    """One rank: ``merge --to hf`` (fp32, bf16) and ``megatron-to-peft`` (fused, per-expert) of ``adapter``."""
    base, out = paths["mg_base"], paths["offline"]
    return F.convert_worker(paths, [
        ["merge", "--base", base, "--adapter", adapter, "--to", "hf", "--output", out + "/merged"],
        ["merge", "--base", base, "--adapter", adapter, "--to", "hf", "--dtype", "bfloat16", "--output",
         out + "/merged_bf16"],
        ["megatron-to-peft", "--adapter", adapter, "--base", base, "--output", out + "/peft_fused"],
        ["megatron-to-peft", "--adapter", adapter, "--base", base, "--expert-layout", "per-expert",
         "--output", out + "/peft_per_expert"]])


def memory_worker(paths, layout, dst):
    """Peak bytes ``export_merged(dtype=bf16, dst=dst)`` allocates on this rank while it makes each
    logical Megatron tensor's Hugging Face pieces (``LiveBytes``, per ``next`` call), with the sizes
    of the documented bound for that tensor: its elements N, this rank's shard S (N/TP, N/ETP for an
    expert, N replicated; 0 where the rank holds none of it), d = 2, and the largest layer's local
    factors in fp32. The model is bf16 too, as it trains."""
    from megatron_lora import lora_modules
    from megatron_lora.hf.export import _held_tensors, arch_from_model, export_merged
    from megatron_lora.hf.mapping import hf_names_of, hf_shapes, megatron_names
    from tests.distributed.export_cases import _settle_collectives
    from tests.distributed.live_bytes import LiveBytes

    model = lora_model(paths, layout, "bfloat16")
    arch, held = arch_from_model(model), _held_tensors(model)
    shapes = hf_shapes(arch)
    tensors = {}
    for name in megatron_names(arch):
        pieces = hf_names_of(name, arch)
        module, pname = held.get(name, (None, None))
        tensors[name] = dict(N=sum(torch.Size(shapes[h]).numel() for h in pieces), pieces=len(pieces),
                             S=getattr(module, pname).numel() if module is not None else 0)
    factors = max(4 * (m.lora_A.numel() + m.lora_B.numel()) for m in lora_modules(model))
    stream, meter, peaks = export_merged(model, dtype=torch.bfloat16, dst=dst), LiveBytes(), []
    _settle_collectives()
    while True:
        meter.peak = 0
        with meter:
            item = next(stream, None)
        peaks.append(meter.peak)
        if item is None:
            break
        del item
    if dst is None or dist.get_rank() == dst:  # per tensor: the calls that yield its pieces
        calls = iter(peaks)
        for entry in tensors.values():
            entry["peak"] = max(next(calls) for _ in range(entry["pieces"]))
    return dict(coordinates(), tensors=tensors, factors=factors, peak=max(peaks), param_dtype=str(
        next(model.parameters()).dtype))


def misplaced_experts_worker():
    """``export_merged``'s error on this rank (None if it raises none) when rank 1 names its experts
    from 0, against Megatron's numbering (EP rank x local experts): what a foreign expert module
    would hold. The tiny MoE GPT of ``moe_adapter_cases`` at this rank's layout."""
    from megatron_lora.core import inject
    from megatron_lora.hf.export import export_merged
    from tests.distributed.moe_adapter_cases import moe_model

    model = moe_model()
    if dist.get_rank() == 1:
        inject._local_expert_offset = lambda experts: 0
    try:
        export_merged(model)
    except ValueError as err:
        return f"{type(err).__name__}: {err}"
    return None


def dora_experts_worker():
    """EP=2, the tiny MoE GPT with DoRA on attention and both (SequentialMLP) expert linears:
    ``export_peft``'s error on this rank, and ``export_merged(dst=None)``'s expert tensors next to
    DoRA's formula in fp64 from this rank's own experts (mapped by the converter's names)."""
    from megatron.core import parallel_state as ps

    from megatron_lora import LoRAConfig, apply_lora, lora_modules
    from megatron_lora.hf.export import arch_from_model, export_merged, export_peft
    from megatron_lora.hf.mapping import ConversionError, hf_from_megatron_tensor
    from tests.distributed.models import build_tiny_gpt
    from tests.distributed.moe_adapter_cases import moe_config

    model = build_tiny_gpt(moe_config(1, ps.get_expert_model_parallel_world_size(), 1))
    lora = LoRAConfig(rank=4, alpha=8, use_dora=True, target_modules=("linear_qkv", "linear_fc1", "linear_fc2"))
    apply_lora(model, lora)
    g = torch.Generator().manual_seed(dist.get_rank())
    with torch.no_grad():
        for m in lora_modules(model):
            m.lora_B.normal_(0, 0.05, generator=g)
            m.lora_magnitude.mul_(0.5 + torch.rand(m.lora_magnitude.shape, generator=g))
    try:
        export_peft(model, dst=0)
        error = None
    except ConversionError as err:
        error = str(err)
    merged = dict(export_merged(model, dtype=torch.float32, dst=None))
    arch, want = arch_from_model(model), {}
    for m in lora_modules(model):
        if ".experts." in m.lora_init_name:
            adapted = m.weight.double() + m.lora_scaling * m.lora_B.double() @ m.lora_A.double()
            dora = (m.lora_magnitude.double() / adapted.norm(dim=1)).unsqueeze(1) * adapted
            want.update(hf_from_megatron_tensor(m.lora_init_name + ".weight", dora, arch))
    diff = max((merged[k].double() - t).abs().max().item() for k, t in want.items())
    return dict(error=error, experts=len(want), streamed=len(merged), diff=diff)
