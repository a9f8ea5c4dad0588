"""Rank workers of ``test_convert_dora.py``: DoRA conversions through the CLI, and the training
script's model built from what they wrote. Kept apart so that ranks do not import transformers / peft."""

import json

import torch

from tests.distributed import convert_cases as C


def convert_worker(p):
    """One rank: both bases in; the PEFT DoRA adapters in (stacked, per projection, the partial one
    with its base norms read from the Megatron checkpoint and from the HF directory); merges; exports."""
    return C._run_cli(
        ["hf-to-megatron", "--hf-dir", p["llama"], "--output", p["mg_llama"], "--target-tensor-parallel-size", 2],
        ["hf-to-megatron", "--hf-dir", p["qwen"], "--output", p["mg_qwen"], "--target-tensor-parallel-size", 2],
        ["peft-to-megatron", "--peft-dir", p["peft_llama"], "--base", p["mg_llama"], "--output", p["llama_dora"]],
        ["peft-to-megatron", "--peft-dir", p["peft_llama"], "--base", p["mg_llama"], "--output", p["llama_dora_pp"],
         "--per-projection"],
        ["peft-to-megatron", "--peft-dir", p["peft_qwen"], "--base", p["mg_qwen"], "--output", p["qwen_dora"]],
        ["peft-to-megatron", "--peft-dir", p["peft_qwen"], "--base", p["qwen"], "--output", p["qwen_dora_hf"]],
        ["merge", "--base", p["mg_llama"], "--adapter", p["peft_llama"], "--to", "hf", "--hf-config-dir", p["llama"],
         "--output", p["merged_llama"]],
        ["merge", "--base", p["mg_qwen"], "--adapter", p["peft_qwen"], "--to", "hf", "--output", p["merged_qwen"]],
        ["merge", "--base", p["mg_qwen"], "--adapter", p["peft_qwen"], "--to", "megatron", "--output",
         p["merged_mg_qwen"]],
        ["megatron-to-peft", "--adapter", p["llama_dora"], "--base", p["mg_llama"], "--output", p["rt_llama"]],
        ["megatron-to-peft", "--adapter", p["llama_dora"], "--base", p["mg_llama"], "--output", p["rt_llama_keep"],
         "--keep-rank"],
        ["megatron-to-peft", "--adapter", p["llama_dora_pp"], "--base", p["mg_llama"], "--output", p["rt_llama_pp"]],
        ["megatron-to-peft", "--adapter", p["qwen_dora"], "--base", p["mg_qwen"], "--output", p["rt_qwen"]])


def _script_model(paths, base, adapter):
    """The model pretrain_gpt_lora.py builds for ``--pretrained-checkpoint base --lora-load adapter``
    with the LoRA flags the conversion printed: its args, then ``loop.build_model``'s steps (base
    loaded, LoRA applied, so m = ‖W‖, then the adapter loaded over it). The tiny models have no
    tokenizer, so build_model's tokenizer check is the one step left out."""
    from megatron_lora import apply_lora
    from megatron_lora.core.checkpoint.adapter import load_full_adapter, read_full_adapter
    from megatron_lora.core.config import LoRAConfig
    from megatron_lora.training.arguments import lora_flags
    from megatron_lora.training.loop import gpt_stage_from_args
    from megatron_lora.training.model_checkpoint import load_model

    cfg = LoRAConfig.from_dict(json.loads(read_full_adapter(paths[adapter])[1]["lora_config"]))
    flags = lora_flags(cfg)
    args = C._script_args(paths, base, ["--lora-load", paths[adapter], *flags])
    model = gpt_stage_from_args(args, args.lora)
    load_model(model, paths[base])
    apply_lora(model, args.lora)
    load_full_adapter(model, args.lora_load)
    return model, flags


def parity_worker(paths):
    """At this run's TP: the script's model from each imported adapter, its logits; the merged
    Megatron checkpoint's; then the stacked Llama import trained a few steps and exported in memory."""
    from megatron_lora.hf.export import export_peft

    out = {}
    for name, base in (("llama_dora", "mg_llama"), ("llama_dora_pp", "mg_llama"), ("qwen_dora", "mg_qwen")):
        model, flags = _script_model(paths, base, name)
        out[name] = dict(logits=C._megatron_logits(model), flags=flags)
    from megatron_lora.training.loop import gpt_stage_from_args
    from megatron_lora.training.model_checkpoint import load_model

    merged = gpt_stage_from_args(C._script_args(paths, "mg_qwen"))  # merge --to megatron: a plain model
    load_model(merged, paths["merged_mg_qwen"])
    out["merged_mg_qwen"] = dict(logits=C._megatron_logits(merged))
    model, _ = _script_model(paths, "mg_llama", "llama_dora")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_magnitude")}
    C.train_steps(model)
    out["trained"] = dict(logits=C._megatron_logits(model), peft=export_peft(model, dst=0),
                          magnitudes_moved=all(not torch.equal(p, before[n]) for n, p in model.named_parameters()
                                               if n in before))
    return out

