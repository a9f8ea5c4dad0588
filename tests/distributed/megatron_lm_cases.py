"""Rank workers of ``test_megatron_lm_real.py``: conversions of Megatron-LM-saved checkpoints through
the CLI, and the Megatron-side logits of the base and of base + adapter.

Kept apart from the test module so that ranks do not import transformers and peft.
"""

import torch

from tests.distributed import convert_cases as C


def convert_worker(paths):
    """One rank: the LoRA checkpoint to PEFT and merged to HF, the base to HF (Megatron-LM's saves)."""
    return C._run_cli(
        ["megatron-to-peft", "--adapter", paths["lora"], "--base", paths["base"], "--output", paths["peft"]],
        ["merge", "--base", paths["base"], "--adapter", paths["lora"], "--to", "hf", "--output", paths["merged_hf"]],
        ["megatron-to-hf", "--base", paths["base"], "--output", paths["base_hf"]])


def logits_worker(paths):
    """Gathered logits of the fixed batch: the Megatron-LM base, then with the adapter loaded, at this TP."""
    from megatron_lora import apply_lora
    from megatron_lora.training.model_checkpoint import load_model, read_model_args
    from megatron_lora.hf.session import build_stage
    from megatron_lora.training.megatron_lm import load_megatron_lm_adapter, megatron_lm_adapter

    ckpt_dir, cfg = megatron_lm_adapter(paths["lora"])
    model = build_stage(read_model_args(paths["base"]))
    load_model(model, paths["base"])
    out = {"base": C._megatron_logits(model)}
    apply_lora(model, cfg)
    load_megatron_lm_adapter(model, ckpt_dir)
    out["lora"], out["rank"] = C._megatron_logits(model), cfg.rank
    return out
