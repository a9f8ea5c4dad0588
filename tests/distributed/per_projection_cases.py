"""Rank workers of ``test_per_projection.py``: per-projection LoRA on the tiny GPT of ``gpt_cases``."""

import os

from megatron_lora.core.config import LoRAConfig
from tests.distributed import gpt_cases as G

PER_PROJECTION = LoRAConfig(rank=4, alpha=8, seed=99, per_projection=True)
STACKED = LoRAConfig(rank=4, alpha=8, seed=99)  # the same LoRA, one A per layer


def save_worker(full_state, root):
    """Train per-projection LoRA 3 steps; save it (dist checkpoint and full file); save an
    untrained one-A-per-layer adapter beside it for the mismatch checks."""
    from megatron_lora.core.checkpoint.adapter import save_adapter, save_full_adapter

    model = G.build_lora_gpt(full_state, cfg=PER_PROJECTION)
    G.plain_train(model, 3)
    save_adapter(model, os.path.join(root, "per_projection"), iteration=3)
    save_full_adapter(model, os.path.join(root, "per_projection.safetensors"))
    stacked = G.build_lora_gpt(full_state, cfg=STACKED)
    save_adapter(stacked, os.path.join(root, "stacked"), iteration=1)
    save_full_adapter(stacked, os.path.join(root, "stacked.safetensors"))
    return dict(adapter=G.local_adapter(model))


def load_worker(full_state, root):
    """Load the per-projection checkpoint at this layout; every mismatched load's message."""
    from megatron_lora.core.checkpoint.adapter import load_adapter, load_full_adapter
    from megatron_lora.core.checkpoint.errors import CheckpointError

    model = G.build_lora_gpt(full_state, cfg=PER_PROJECTION)
    load_adapter(model, os.path.join(root, "per_projection"))
    errors = {}
    for label, cfg, load, source in (
            ("per-projection dist into stacked", STACKED, load_adapter, "per_projection"),
            ("per-projection full into stacked", STACKED, load_full_adapter, "per_projection.safetensors"),
            ("stacked dist into per-projection", PER_PROJECTION, load_adapter, "stacked"),
            ("stacked full into per-projection", PER_PROJECTION, load_full_adapter, "stacked.safetensors")):
        try:
            load(G.build_lora_gpt(full_state, cfg=cfg), os.path.join(root, source))
        except CheckpointError as err:
            errors[label] = str(err)
    return dict(adapter=G.local_adapter(model), errors=errors)


# ------------------------------------------------------- the proof: PEFT -> train at TP=2 -> PEFT

def peft_import_worker(paths):
    """One rank: the HF Llama as a Megatron base; the PEFT adapter imported per projection."""
    from tests.distributed import convert_cases as C

    return C._run_cli(
        ["hf-to-megatron", "--hf-dir", paths["llama"], "--output", paths["mg_llama"],
         "--target-tensor-parallel-size", 2],
        ["peft-to-megatron", "--peft-dir", paths["peft"], "--base", paths["mg_llama"], "--output", paths["imported"],
         "--per-projection"])


def peft_train_worker(paths):
    """TP=2: the imported adapter loaded as the training script loads --lora-load (with the flags
    the converter printed), its logits; a few AdamW steps; the in-memory PEFT export; the saves."""
    import json

    from megatron_lora import apply_lora
    from megatron_lora.core.checkpoint.adapter import (
        load_full_adapter, read_full_adapter, save_adapter, save_full_adapter,
    )
    from megatron_lora.training.model_checkpoint import load_model
    from megatron_lora.hf.export import export_peft
    from megatron_lora.training.arguments import lora_flags
    from megatron_lora.training.loop import gpt_stage_from_args
    from tests.distributed import convert_cases as C

    imported = LoRAConfig.from_dict(json.loads(read_full_adapter(paths["imported"])[1]["lora_config"]))
    args = C._script_args(paths, "mg_llama", ["--lora-load", paths["imported"], *lora_flags(imported)])
    model = gpt_stage_from_args(args, args.lora)
    load_model(model, paths["mg_llama"])
    apply_lora(model, args.lora)
    load_full_adapter(model, args.lora_load)
    out = dict(config=args.lora, imported=C._megatron_logits(model))
    C.train_steps(model)
    out["trained"] = C._megatron_logits(model)
    hf_config = json.load(open(os.path.join(paths["llama"], "config.json")))
    out["exported"] = export_peft(model, hf_config, dst=0)
    save_adapter(model, paths["lora_save"], iteration=C.TRAIN_STEPS)
    save_full_adapter(model, paths["lora_save"] + ".safetensors")
    return out


def peft_offline_worker(paths):
    """One rank: megatron-to-peft of the trained adapter, from the full file and the dist checkpoint."""
    from tests.distributed import convert_cases as C

    return C._run_cli(
        ["megatron-to-peft", "--adapter", paths["lora_save"] + ".safetensors", "--base", paths["mg_llama"],
         "--output", paths["peft_full"]],
        ["megatron-to-peft", "--adapter", paths["lora_save"], "--iteration", C.TRAIN_STEPS, "--base",
         paths["mg_llama"], "--output", paths["peft_dist"]])
