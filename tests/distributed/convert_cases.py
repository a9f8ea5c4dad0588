"""Rank workers of ``test_convert.py``: conversions through the CLI and Megatron-side logits.

Kept apart from the test module so that ranks (which import the module of the function they run)
do not import transformers and peft: only the pytest process needs them, as the reference.
"""

import contextlib
import importlib.util
import io
import json
import os
import shlex

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(ROOT, "scripts", "convert_checkpoint.py")
VOCAB, SEQ, BATCH = 384, 16, 2  # the byte-level tokenizer (257 ids) pads to 384 too
TRAIN_STEPS = 3


def tokens():
    """The fixed batch every model is compared on: [b, s]."""
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(11))


def cli():
    """scripts/convert_checkpoint.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_cli(*commands):
    """Each command through the CLI's main() in this process; returns the printed output."""
    module, out = cli(), io.StringIO()
    with contextlib.redirect_stdout(out):
        for command in commands:
            assert module.main([str(c) for c in command]) == 0, (command, out.getvalue())
    return out.getvalue()


def convert_worker(paths):
    """One rank: both HF models to Megatron, the PEFT adapter in, both merges, both bases back out."""
    p = paths
    return _run_cli(
        ["hf-to-megatron", "--hf-dir", p["llama"], "--output", p["mg_llama"], "--target-tensor-parallel-size", 2],
        ["hf-to-megatron", "--hf-dir", p["qwen"], "--output", p["mg_qwen"], "--target-tensor-parallel-size", 2],
        ["peft-to-megatron", "--peft-dir", p["peft"], "--base", p["mg_llama"], "--output", p["imported.safetensors"]],
        ["merge", "--base", p["mg_llama"], "--adapter", p["imported.safetensors"], "--to", "hf",
         "--hf-config-dir", p["llama"], "--output", p["merged_hf"]],
        ["merge", "--base", p["mg_llama"], "--adapter", p["peft"], "--to", "megatron", "--output", p["merged_mg"]],
        ["megatron-to-hf", "--base", p["mg_llama"], "--output", p["base_hf_llama"]],  # config.json written
        ["megatron-to-hf", "--base", p["mg_qwen"], "--output", p["base_hf_qwen"]])


def without_flags(flags, names) -> list:
    """``flags`` without the given ``--flag VALUE`` pairs."""
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in names:
            skip = True
        else:
            out.append(flag)
    return out


def _script_args(paths, base, extra=()):
    """The training script's validated args for the model flags the conversion wrote."""
    from megatron_lora.training.pretrain_args import parse_args, validate_args

    with open(os.path.join(paths[base], "model_flags.txt")) as f:
        flags = without_flags(shlex.split(f.read()), ("--tokenizer-type", "--tokenizer-model"))
    flags += ["--seq-length", SEQ, "--micro-batch-size", BATCH, "--train-iters", TRAIN_STEPS, "--lr", "1e-2",
              "--data-path", paths["data"], "--device", "cpu", "--tensor-model-parallel-size",
              torch.distributed.get_world_size(), *extra]
    return validate_args(parse_args([str(f) for f in flags]), torch.distributed.get_world_size())


def _megatron_logits(model, ids=None):
    """Logits of ``ids`` (default: the fixed batch), gathered over TP: [b, s, vocab]."""
    from megatron.core import parallel_state as ps

    ids = tokens() if ids is None else ids
    model.eval()
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    shards = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(shards, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def parity_worker(paths):
    """Gathered logits of the converted base, base + imported adapter, merged checkpoint and Qwen2
    at this run's TP, each built the way pretrain_gpt_lora.py builds it from the written flags."""
    from megatron_lora import apply_lora
    from megatron_lora.core.checkpoint.adapter import load_full_adapter, read_full_adapter
    from megatron_lora.core.config import LoRAConfig
    from megatron_lora.training.arguments import lora_flags
    from megatron_lora.hf.mapping import split_qkv
    from megatron_lora.training.model_checkpoint import load_model, read_model_args
    from megatron_lora.training.checkpoint_dirs import describe_mismatch
    from megatron_lora.training.pretrain_args import model_args
    from megatron_lora.training.loop import gpt_stage_from_args

    out = {}
    meta = read_full_adapter(paths["imported.safetensors"])[1]
    imported = LoRAConfig.from_dict(json.loads(meta["lora_config"]))
    args = _script_args(paths, "mg_llama", ["--lora-load", paths["imported.safetensors"], *lora_flags(imported)])
    out["flags_mismatch"] = describe_mismatch(read_model_args(paths["mg_llama"]), model_args(args))
    base = gpt_stage_from_args(args)
    load_model(base, paths["mg_llama"])
    out["base"] = _megatron_logits(base)
    lora = gpt_stage_from_args(args, args.lora)  # what the script does with --lora-load
    load_model(lora, paths["mg_llama"])
    apply_lora(lora, args.lora)
    load_full_adapter(lora, args.lora_load)
    out["lora"], out["lora_config"] = _megatron_logits(lora), args.lora
    merged = gpt_stage_from_args(args)
    load_model(merged, paths["merged_mg"])
    out["merged_mg"] = _megatron_logits(merged)
    qwen = gpt_stage_from_args(_script_args(paths, "mg_qwen"))
    load_model(qwen, paths["mg_qwen"])
    out["qwen"] = _megatron_logits(qwen)
    if torch.distributed.get_world_size() == 1:  # the harness bites: [Q; K; V] blocks instead of groups
        with torch.no_grad():
            for layer in base.decoder.layers:
                qkv = layer.self_attention.linear_qkv.weight
                qkv.copy_(torch.cat(split_qkv(qkv, 4, 2)))
        out["qkv_as_blocks"] = _megatron_logits(base)
    return out


def train_steps(model):
    """``TRAIN_STEPS`` AdamW steps on the LoRA factors, on fixed random batches."""
    from megatron_lora import lora_parameters

    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    batches = torch.randint(0, VOCAB, (TRAIN_STEPS, BATCH, SEQ + 1), generator=torch.Generator().manual_seed(5))
    for batch in batches:
        opt.zero_grad()
        loss = model(batch[:, :-1], torch.arange(SEQ).expand(BATCH, -1), None, labels=batch[:, 1:]).mean()
        loss.backward()
        opt.step()


def train_worker(paths):
    """LoRA trained at TP=2 on the converted base; saved as the script saves (dist + full file)."""
    from megatron_lora import apply_lora
    from megatron_lora.core.checkpoint.adapter import save_adapter, save_full_adapter
    from megatron_lora.training.model_checkpoint import load_model
    from megatron_lora.training.loop import gpt_stage_from_args

    args = _script_args(paths, "mg_llama", ["--lora-rank", "4", "--lora-alpha", "8", "--lora-seed", "7"])
    model = gpt_stage_from_args(args, args.lora)
    load_model(model, paths["mg_llama"])
    apply_lora(model, args.lora)
    train_steps(model)
    save_adapter(model, paths["lora_save"], iteration=TRAIN_STEPS)
    save_full_adapter(model, os.path.join(paths["lora_save"], "adapter.safetensors"))
    return _megatron_logits(model)


def export_worker(paths):
    """One rank: the trained adapter out (full file; dist checkpoint), the imported one back out."""
    p = paths
    return _run_cli(
        ["megatron-to-peft", "--adapter", p["lora_save"], "--base", p["mg_llama"], "--output", p["peft_export"]],
        ["megatron-to-peft", "--adapter", p["lora_save"], "--iteration", TRAIN_STEPS, "--base", p["llama"],
         "--output", p["peft_export_dist"]],
        ["megatron-to-peft", "--adapter", p["imported.safetensors"], "--base", p["mg_llama"],
         "--output", p["peft_roundtrip"]])
