"""Rank workers of ``test_export.py``: in-memory exports at TP=2 / PP=2 and the file conversions
they must equal. Kept apart from the test module so that ranks do not import transformers / peft.
"""

import json
import os

import torch
import torch.distributed as dist

from tests.distributed import convert_cases as C

LAYOUTS = {"tp2": dict(tp=2, pp=1, dp=1), "pp2": dict(tp=1, pp=2, dp=1), "tp2pp2": dict(tp=2, pp=2, dp=1),
           "tp2pp2dp2": dict(tp=2, pp=2, dp=2), "tp2_per_projection": dict(tp=2, pp=1, dp=1, per_projection=True),
           "tp2pp2_dora": dict(tp=2, pp=2, dp=1, dora=True)}
ITERATION = 1


def convert_worker(paths, hf="llama", megatron="mg_llama"):
    """One rank: the HF Llama as a Megatron base checkpoint."""
    return C._run_cli(["hf-to-megatron", "--hf-dir", paths[hf], "--output", paths[megatron]])


def _randomize_lora_b(model, seed=3):
    """Non-zero B's (A keeps its init) and DoRA magnitudes off the norm (x [0.5, 1.5)) through the
    logical adapter, so every layout gets the same."""
    from megatron_lora.core.checkpoint.adapter import gather_full_adapter, load_full_adapter

    g = torch.Generator().manual_seed(seed)
    full = gather_full_adapter(model)
    for name in sorted(full):
        if name.endswith("lora_B"):
            full[name] = torch.randn(full[name].shape, generator=g, dtype=full[name].dtype) * 0.05
        elif name.endswith("lora_magnitude"):
            full[name] = full[name] * (0.5 + torch.rand(full[name].shape, generator=g, dtype=full[name].dtype))
    load_full_adapter(model, full)


def _pipeline_logits(model):
    """Logits of ``C.tokens()`` gathered over TP, on the last stage (None elsewhere): stage 0's
    output goes to the next stage by plain p2p, as the schedules would send it."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return C._megatron_logits(model)
    model.eval()
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(C.SEQ, C.BATCH, model.config.hidden_size)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(C.tokens(), torch.arange(C.SEQ).expand(C.BATCH, -1), None)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    shards = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def _parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def export_worker(paths, layout):
    """LoRA on the converted base at this layout; every export; the saves the converter reads."""
    from megatron.core import parallel_state as ps

    from megatron_lora import apply_lora
    from megatron_lora.core.checkpoint.adapter import save_adapter, save_full_adapter
    from megatron_lora.training.model_checkpoint import load_model
    from megatron_lora.hf.export import export_merged, export_peft
    from megatron_lora.training.loop import gpt_stage_from_args
    from tests.distributed.received_bytes import ReceivedBytes

    sizes = LAYOUTS[layout]
    args = C._script_args(paths, "mg_llama", [
        "--lora-rank", "4", "--lora-alpha", "8", "--lora-seed", "7",
        "--tensor-model-parallel-size", sizes["tp"], "--pipeline-model-parallel-size", sizes["pp"],
        *(["--lora-per-projection"] if sizes.get("per_projection") else []),
        *(["--lora-use-dora"] if sizes.get("dora") else [])])
    model = gpt_stage_from_args(args, args.lora)
    load_model(model, paths["mg_llama"])
    apply_lora(model, args.lora)
    _randomize_lora_b(model)
    before = _parameters(model)
    hf_config = json.load(open(os.path.join(paths["llama"], "config.json")))
    out = dict(
        peft=export_peft(model, hf_config, dst=0),
        peft_every_rank=export_peft(model, dst=None),
        merged=dict(export_merged(model, hf_config, dtype=torch.float32, dst=0)),
        merged_every_rank=dict(export_merged(model, dtype=torch.float32, dst=None)),
        merged_on_rank1=dict(export_merged(model, dtype=torch.float32, dst=1)))
    with ReceivedBytes() as received:
        out["merged_bf16"] = dict(export_merged(model, dtype=torch.bfloat16, dst=0))
    out["received"] = dict(received.by_op, objects=sum(received.object_calls.values()))
    out["coords"] = dict(dp=ps.get_data_parallel_rank(), pp=ps.get_pipeline_model_parallel_rank(),
                         tp=ps.get_tensor_model_parallel_rank())
    out["own_bf16"] = sum(2 * p.numel() for name, p in model.named_parameters()
                          if not name.endswith(("lora_A", "lora_B")))  # this rank's base shards in bf16
    after = _parameters(model)
    out["unchanged"] = sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    out["lora_tensors"] = sum(1 for k in before if k.endswith(("lora_A", "lora_B")))
    out["logits"] = _pipeline_logits(model)
    save_adapter(model, paths[f"save_{layout}"], iteration=ITERATION)
    save_full_adapter(model, paths[f"save_{layout}"] + ".safetensors")
    return out


def offline_worker(paths, layout):
    """One rank: the file conversions of the adapter the layout saved."""
    save, base = paths[f"save_{layout}"], paths["mg_llama"]
    out = paths[f"offline_{layout}"]
    return C._run_cli(
        ["megatron-to-peft", "--adapter", save, "--iteration", ITERATION, "--base", base,
         "--output", out + "/peft_dist"],
        ["megatron-to-peft", "--adapter", save + ".safetensors", "--base", base, "--output", out + "/peft_full"],
        ["merge", "--base", base, "--adapter", save + ".safetensors", "--to", "hf", "--output", out + "/merged"],
        ["merge", "--base", base, "--adapter", save, "--iteration", ITERATION, "--to", "hf", "--dtype", "bfloat16",
         "--output", out + "/merged_bf16"])


def vpp_worker(paths):
    """The 4-layer Llama at PP=2 with 2 virtual stages per rank (layers 0 and 2 on stage 0, 1 and 3
    on stage 1): ``export_merged`` in fp32 and bf16 on rank 0, and the adapter saved for the
    conversion (the rank-0 run of ``vpp_offline_worker``)."""
    from megatron.core import parallel_state as ps

    from megatron_lora import apply_lora
    from megatron_lora.core.checkpoint.adapter import save_full_adapter
    from megatron_lora.training.gpt import build_gpt_stage
    from megatron_lora.hf.export import export_merged
    from megatron_lora.training.pretrain_args import transformer_config_from_args

    args = C._script_args(paths, "mg_llama4", [
        "--lora-rank", "4", "--lora-alpha", "8", "--lora-seed", "7",
        "--tensor-model-parallel-size", 1, "--pipeline-model-parallel-size", 2])
    config = transformer_config_from_args(args)
    config.virtual_pipeline_model_parallel_size = 2
    chunks = [build_gpt_stage(
        config, args.padded_vocab_size, args.max_position_embeddings, lora_config=args.lora,
        transformer_impl=args.transformer_impl,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp), vp_stage=vp)
        for vp in range(2)]
    _load_chunks(chunks, paths["mg_llama4"])
    apply_lora(chunks, args.lora)
    _randomize_lora_b(chunks)
    out = dict(merged=dict(export_merged(chunks, dtype=torch.float32, dst=0)),
               merged_bf16=dict(export_merged(chunks, dtype=torch.bfloat16, dst=0)),
               layers=sorted(layer.layer_number - 1 for chunk in chunks for layer in chunk.decoder.layers))
    save_full_adapter(chunks, paths["save_vpp"] + ".safetensors")
    return out


def _load_chunks(chunks, path):
    """``load_model`` for virtual-pipeline chunks. ``load_model(chunks)`` itself fails: its
    ``base_sharded_state_dict`` keys every chunk's entries by the chunk-local name
    ("decoder.layers.0...", the global layer is an offset), so the second chunk's entries replace
    the first's; here each chunk's keys get their own prefix (Megatron-LM's "model0", "model1")."""
    from megatron.core import dist_checkpointing

    from megatron_lora.core.checkpoint import dist_state
    from megatron_lora.training.model_checkpoint import base_sharded_state_dict, resolve

    ckpt_dir = resolve(path)
    metadata = dist_checkpointing.load_content_metadata(ckpt_dir)
    sharded = {f"model{i}.{key}": entry for i, chunk in enumerate(chunks)
               for key, entry in base_sharded_state_dict(chunk, metadata=metadata).items()}
    dist_state.copy_loaded(sharded, dist_state.load_dist(sharded, ckpt_dir))


def vpp_offline_worker(paths):
    """One rank: ``merge --to hf`` of the adapter the VPP run saved, in fp32 and bf16."""
    save, base, out = paths["save_vpp"] + ".safetensors", paths["mg_llama4"], paths["offline_vpp"]
    return C._run_cli(
        ["merge", "--base", base, "--adapter", save, "--to", "hf", "--output", out + "/merged"],
        ["merge", "--base", base, "--adapter", save, "--to", "hf", "--dtype", "bfloat16", "--output",
         out + "/merged_bf16"])


# ------------------------------------------------------------------------------------ memory

def memory_worker(num_layers, keep_all, dtype_name, dst=None, dora=False):
    """Peak bytes the merged stream allocates on this rank, in all and per logical Megatron
    tensor (while it makes that tensor's Hugging Face pieces), with the model and the export in
    ``dtype_name``; the sizes of the documented bound (``export_merged``'s docstring): each
    tensor's elements N and this rank's shard S (N/t, or N for a replicated norm), the largest
    layer's local factors in fp32; the logical bytes of one layer and of the model. ``keep_all``
    keeps every yielded tensor inside the meter (the meter must see them); ``dora``: the adapter is DoRA."""
    from megatron_lora import LoRAConfig, apply_lora, lora_modules
    from megatron_lora.hf.export import arch_from_model, export_merged
    from megatron_lora.hf.mapping import hf_names_of, hf_shapes, megatron_names
    from tests.distributed.live_bytes import LiveBytes
    from tests.distributed.models import build_tiny_gpt, tiny_gpt_config, tp_rank

    dtype = getattr(torch, dtype_name)
    tp, _ = tp_rank()
    config = tiny_gpt_config(tp=tp, num_layers=num_layers, params_dtype=dtype)
    model = apply_lora(build_tiny_gpt(config), LoRAConfig(rank=4, alpha=8, use_dora=dora))
    _randomize_lora_b(model)
    arch = arch_from_model(model)
    shapes = hf_shapes(arch)
    tensors = {}
    for name in megatron_names(arch):
        n = sum(torch.Size(shapes[h]).numel() for h in hf_names_of(name))
        tensors[name] = dict(N=n, S=n if "layernorm" in name else n // tp, pieces=hf_names_of(name))
    factors = max(4 * (m.lora_A.numel() + m.lora_B.numel()) for m in lora_modules(model))
    stream, meter, kept, sizes, peaks = export_merged(model, dtype=dtype, dst=dst), LiveBytes(), [], {}, []
    _settle_collectives()
    while True:
        meter.peak = 0  # this call's peak: what is live while it allocates
        with meter:
            item = next(stream, None)
            if item is not None and keep_all:
                kept.append(item[1])
        peaks.append(meter.peak)
        if item is None:
            break
        sizes[item[0]] = item[1].nbytes
        del item
    if dst is None or dist.get_rank() == dst:  # per tensor: its pieces' calls, in stream order
        calls = iter(peaks)
        for entry in tensors.values():
            entry["peak"] = max(next(calls) for _ in entry["pieces"])
    layer = sum(n for name, n in sizes.items() if name.startswith("model.layers.0."))
    largest = max(tensors.values(), key=lambda entry: entry["N"])
    return dict(peak=max(peaks), layer=layer, model=sum(sizes.values()), tensors=len(sizes), N=largest["N"],
                S=largest["S"], per_tensor=tensors, factors=factors, d=torch.empty(0, dtype=dtype).element_size(),
                param_dtype=str(next(model.parameters()).dtype))


def _settle_collectives(seconds=0.01):
    """Let gloo's worker thread drop its reference to a finished collective's tensors before the
    stream goes on: it still holds them for a moment after ``wait()`` returns, so without this
    pause the meter sees the previous tensor alive a little longer or not, by thread timing."""
    import time

    for name in ("all_gather", "gather", "broadcast", "send", "recv", "all_reduce"):
        def settled(*args, _original=getattr(dist, name), **kwargs):
            out = _original(*args, **kwargs)
            time.sleep(seconds)
            return out

        setattr(dist, name, settled)


# ------------------------------------------------------------------- buckets and a failing consumer

def _tiny_lora_gpt():
    """The tiny GPT of ``models.py`` at this rank's TP / PP, LoRA r=4 with non-zero B's."""
    from megatron.core import parallel_state as ps

    from megatron_lora import LoRAConfig, apply_lora
    from tests.distributed.models import build_tiny_gpt, tiny_gpt_config

    config = tiny_gpt_config(tp=ps.get_tensor_model_parallel_world_size(),
                             pp=ps.get_pipeline_model_parallel_world_size())
    model = apply_lora(build_tiny_gpt(config), LoRAConfig(rank=4, alpha=8))
    _randomize_lora_b(model)
    return model


def bucket_worker(bucket_bytes):
    """The plain stream and the bucketed one, on rank 0 (dst=0): [(name, tensor)] and [[...]]."""
    from megatron_lora.hf.export import export_merged

    model = _tiny_lora_gpt()
    return dict(plain=list(export_merged(model, dtype=torch.bfloat16)),
                buckets=list(export_merged(model, dtype=torch.bfloat16, bucket_bytes=bucket_bytes)))


def failing_consumer_worker(dst, raising_rank, moe=False):
    """``export_merged_to`` with a consumer that raises on its 2nd tensor on ``raising_rank``;
    then a plain ``export_merged`` run, which only completes if every rank left the first with
    the collective schedule intact. Returns (names consumed, the error or None, names after).
    ``moe``: the tiny MoE GPT of ``moe_adapter_cases`` at this rank's expert layout."""
    from megatron_lora.hf.export import export_merged, export_merged_to
    from tests.distributed.moe_adapter_cases import moe_model

    model, seen = moe_model() if moe else _tiny_lora_gpt(), []

    def consume(name, tensor):
        seen.append(name)
        if dist.get_rank() == raising_rank and len(seen) == 2:
            raise RuntimeError(f"the engine refused {name}")

    error = None
    try:
        export_merged_to(consume, model, dtype=torch.bfloat16, dst=dst)
    except RuntimeError as err:
        error = str(err)
    after = [name for name, _ in export_merged(model, dtype=torch.bfloat16, dst=dst)]
    return seen, error, after


def nonfinite_worker(bad_rank):
    """The message ``export_merged`` raises on this rank when ``bad_rank``'s shard of one B holds
    a NaN (None if it raises nothing), and the ``*_object`` calls it made."""
    from megatron_lora import lora_modules
    from megatron_lora.hf.export import export_merged
    from tests.distributed.received_bytes import ReceivedBytes

    model = _tiny_lora_gpt()
    if dist.get_rank() == bad_rank:
        with torch.no_grad():
            list(lora_modules(model))[-1].lora_B[0, 0] = float("nan")
    with ReceivedBytes() as received:
        try:
            export_merged(model)
            error = None
        except ValueError as err:
            error = f"{type(err).__name__}: {err}"
    return error, sum(received.object_calls.values())


# ------------------------------------------------------------------------------------ errors

def errors_worker():
    """{case: the error's message} for what the exports must refuse before gathering anything."""
    import torch.nn.functional as F

    from megatron_lora import LoRAConfig, apply_lora, merge_lora
    from megatron_lora.hf.export import export_merged, export_peft
    from tests.distributed.models import build_tiny_gpt, tiny_gpt_config

    def message(call):
        try:
            call()
        except (ValueError, TypeError) as err:
            return f"{type(err).__name__}: {err}"
        return None

    lora = LoRAConfig(rank=4, alpha=8)
    llama = apply_lora(build_tiny_gpt(tiny_gpt_config()), lora)
    gelu = apply_lora(build_tiny_gpt(tiny_gpt_config(gated_linear_unit=False, activation_func=F.gelu)), lora)
    shared_expert = apply_lora(build_tiny_gpt(tiny_gpt_config(
        num_moe_experts=4, moe_router_topk=2, moe_shared_expert_intermediate_size=64)), lora)
    other_vocab = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=32000)
    out = {
        "gelu": message(lambda: export_peft(gelu)),
        "shared expert": message(lambda: export_merged(shared_expert)),
        "hf_config of another model": message(lambda: export_merged(llama, other_vocab)),
        "bad dst": message(lambda: export_peft(llama, dst=3)),
    }
    merge_lora(llama)
    out["merged"] = message(lambda: export_merged(llama))
    return out


def assert_schedule_kept(ranks, dst, raising_rank, everything: int) -> None:
    """``failing_consumer_worker``'s results: only ``raising_rank`` re-raised (after its 2nd tensor),
    every other receiving rank consumed all ``everything`` tensors, and the plain export after it
    reached every receiving rank in full."""
    for rank, (seen, error, after) in enumerate(ranks):
        receives = dst is None or rank == dst
        assert len(after) == (everything if receives else 0)
        if rank == raising_rank:
            assert len(seen) == 2 and error == f"the engine refused {seen[1]}"
        else:
            assert error is None and len(seen) == (everything if receives else 0)
