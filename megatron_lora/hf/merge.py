"""``merge`` and ``megatron-to-hf``: a base with its adapter folded in, as a Megatron or a Hugging
Face checkpoint (no adapter: just the base, converted)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Optional

import torch

from megatron_lora.core.checkpoint import atomic_save
from megatron_lora.hf.mapping import (
    Arch, ConversionError, arch_from_model_args, check_hf_config_matches, hf_config_for, hf_from_megatron,
)
from megatron_lora.hf.session import base_tensors, build_stage, megatron_session
from megatron_lora.hf.sources import DTYPES, Log, check_new_output, read_adapter, read_base, read_json, silent
from megatron_lora.hf.to_megatron import FLAGS_FILE


def merge(base: str, adapter: Optional[str], output: str, to: str = "megatron", hf_config_dir: Optional[str] = None,
          dtype: str = "float32", iteration: Optional[int] = None, log: Log = silent) -> None:
    """Fold ``adapter`` into the Megatron checkpoint ``base`` (no adapter: just convert the base)
    and write a Megatron checkpoint (``to="megatron"``) or a Hugging Face one (``to="hf"``)."""
    if to not in ("megatron", "hf"):
        raise ConversionError(f"--to {to!r}: choose 'megatron' or 'hf'.")
    model_args, hf_dir = read_base(base)
    if hf_dir is not None:
        raise ConversionError(f"--base {base} is a Hugging Face model; convert it with hf-to-megatron first.")
    arch = arch_from_model_args(model_args, base) if to == "hf" else None
    if hf_config_dir is not None and to != "hf":
        raise ConversionError("--hf-config-dir is for --to hf; a Megatron output keeps the base's model_args.json.")
    if hf_config_dir is not None:
        check_hf_config_matches(read_json(os.path.join(hf_config_dir, "config.json"), "pass the HF model dir"),
                                arch, os.path.join(hf_config_dir, "config.json"))
    check_new_output(output)
    tensors, cfg = read_adapter(adapter, model_args, iteration, log, base) if adapter else (None, None)
    from megatron_lora import merge_lora
    from megatron_lora.core.checkpoint.adapter import load_full_adapter
    from megatron_lora.training.model_checkpoint import load_model, save_model
    from megatron_lora.training.pretrain_args import MODEL_ARG_NAMES

    with megatron_session():
        model = build_stage(model_args, cfg)
        log(f"loading the base {base}")
        load_model(model, base)
        if cfg is not None:
            load_full_adapter(model, tensors)
            merge_lora(model)
            log(f"merged the adapter (rank {cfg.rank}, {' '.join(cfg.target_modules)})")
        if to == "megatron":
            record = {k: model_args[k] for k in MODEL_ARG_NAMES if k in model_args}
            save_model(model.to(DTYPES[dtype]), output, 0, record)
            flags = os.path.join(base, FLAGS_FILE)
            if os.path.exists(flags):
                shutil.copy(flags, os.path.join(output, FLAGS_FILE))
        else:
            state = {k: v.detach() for k, v in base_tensors(model).items()}
            write_hf(hf_from_megatron(state, arch), arch, model_args, output, hf_config_dir, dtype, log)
    log(f"wrote {'a Megatron' if to == 'megatron' else 'a Hugging Face'} checkpoint to {output}")


def write_hf(tensors: Dict[str, torch.Tensor], arch: Arch, model_args: dict, output: str,
             hf_config_dir: Optional[str], dtype: str, log: Log = silent, shard_bytes: int = 5 * 2 ** 30) -> None:
    """config.json + safetensors (sharded with an index above ``shard_bytes``) that
    ``AutoModelForCausalLM.from_pretrained`` loads; the original config and tokenizer files
    of ``hf_config_dir`` are kept when given."""
    from safetensors.torch import save_file

    os.makedirs(output, exist_ok=True)
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        tensor = tensor.to(DTYPES[dtype]).contiguous().cpu()
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name], size = tensor, size + tensor.nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, (file, shard) in enumerate(zip(names, shards)):
        save_file(shard, os.path.join(output, file), metadata={"format": "pt"})
        log(f"  wrote {file} ({i + 1}/{len(shards)})")
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s.values())},
                 "weight_map": {n: f for f, s in zip(names, shards) for n in s}}
        atomic_save.atomic_write_text(os.path.join(output, "model.safetensors.index.json"), json.dumps(index, indent=2))
    if hf_config_dir is None:
        config = hf_config_for(arch, model_args, dtype)
    else:
        config = read_json(os.path.join(hf_config_dir, "config.json"), "")
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtype
        for file in sorted(os.listdir(hf_config_dir)):  # tokenizer, generation config, chat template
            src = os.path.join(hf_config_dir, file)
            if os.path.isfile(src) and file != "config.json" and not file.endswith(
                    (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")):
                shutil.copy(src, os.path.join(output, file))
    atomic_save.atomic_write_text(os.path.join(output, "config.json"), json.dumps(config, indent=2))
