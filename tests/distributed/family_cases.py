"""Rank workers of ``test_convert_families.py``: Qwen3 / Qwen3-MoE / Mixtral conversions through
the CLI, and Megatron logits of the converted models at TP / EP / SP layouts.

Every Megatron model is built the way ``pretrain_gpt_lora.py`` builds it: ``parse_args`` /
``validate_args`` on the ``model_flags.txt`` the conversion wrote plus the layout flags, then
``gpt_stage_from_args`` and ``load_model``. Kept apart from the test module so that ranks do not
import transformers (only the pytest process needs it, as the reference).
"""

import os
import shlex
import zlib

import torch

from tests.distributed.convert_cases import BATCH, SEQ, _megatron_logits, _run_cli, without_flags

LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")  # unscoped: experts in a MoE model


def convert_worker(paths, commands):
    """One rank: ``commands`` through the CLI's main(); the printed output."""
    return _run_cli(*[[str(paths.get(c, c)) for c in command] for command in commands])


def script_args(paths, key, layout, extra=()):
    """The training script's validated args for ``paths[key]``'s model_flags.txt at ``layout``
    (``dict(tp=, ep=, sp=)``; this process group's world size)."""
    from megatron_lora.training.pretrain_args import parse_args, validate_args

    with open(os.path.join(paths[key], "model_flags.txt")) as f:
        flags = without_flags(shlex.split(f.read()), ("--tokenizer-type", "--tokenizer-model"))
    flags += ["--seq-length", SEQ, "--micro-batch-size", BATCH, "--train-iters", 3, "--lr", "1e-2",
              "--data-path", paths["data"], "--device", "cpu", "--tensor-model-parallel-size", layout.get("tp", 1)]
    if layout.get("ep", 1) > 1:
        flags += ["--expert-model-parallel-size", layout["ep"]]
    if layout.get("sp"):
        flags.append("--sequence-parallel")
    world = torch.distributed.get_world_size()
    return validate_args(parse_args([str(f) for f in [*flags, *extra]]), world)


def _fill_b(model):
    """Every lora_B set from its logical (global) name, so replicas on other ranks agree and the
    adapter does not depend on the layout."""
    from megatron_lora.core.inject import lora_modules

    with torch.no_grad():
        for m in lora_modules(model):
            g = torch.Generator().manual_seed(zlib.crc32(m.lora_init_name.encode()))
            full = torch.randn(m.lora_B.shape, generator=g) * 0.2  # this rank's shard shape: TP=1 here
            m.lora_B.copy_(full)


def parity_worker(paths, key, layout, hf_config, adapter=None):
    """The converted model's gathered logits at this layout, the architecture the in-memory export
    reads from it (checked against ``hf_config``), the flags it was built with, and (``adapter``:
    a path) the logits with a LoRA adapter on attention and experts, saved there as a full adapter
    (TP=1 layouts: B is filled per global name)."""
    from megatron_lora import LoRAConfig, apply_lora
    from megatron_lora.core.checkpoint.adapter import save_full_adapter
    from megatron_lora.hf.export import arch_from_model
    from megatron_lora.training.checkpoint_dirs import describe_mismatch
    from megatron_lora.training.loop import gpt_stage_from_args
    from megatron_lora.training.model_checkpoint import load_model, read_model_args
    from megatron_lora.training.pretrain_args import model_args

    args = script_args(paths, key, layout)
    model = gpt_stage_from_args(args)
    load_model(model, paths[key])
    out = dict(logits=_megatron_logits(model), arch=arch_from_model(model, hf_config),
               mismatch=describe_mismatch(read_model_args(paths[key]), model_args(args)))
    if layout.get("swap_experts"):  # the harness bites: layer 0's experts 0 and 1 exchanged
        with torch.no_grad():
            experts = model.decoder.layers[0].mlp.experts.local_experts
            for leaf in ("linear_fc1", "linear_fc2"):
                a, b = getattr(experts[0], leaf).weight, getattr(experts[1], leaf).weight
                tmp = a.clone()
                a.copy_(b)
                b.copy_(tmp)
        out["swapped"] = _megatron_logits(model)
    if adapter:
        lora = LoRAConfig(rank=4, alpha=8, seed=3, target_modules=LORA_TARGETS)
        model = gpt_stage_from_args(args, lora)
        load_model(model, paths[key])
        apply_lora(model, lora)
        _fill_b(model)
        out["lora_logits"] = _megatron_logits(model)
        save_full_adapter(model, adapter)
    return out

