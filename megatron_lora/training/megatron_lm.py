"""Megatron-LM adoption: LoRA in a Megatron-LM checkout's own ``pretrain_gpt.py``, no file edited.

``patches/pretrain_gpt_lora.py`` runs the checkout's ``pretrain_gpt.py`` as ``__main__`` after
replacing ``megatron.training.pretrain`` with :func:`lora_pretrain`, which changes two arguments:

- ``extra_args_provider``: the fork's own one (ModelOpt's, if any), then ``add_lora_args``;
- ``model_provider``: the fork's one, then, with ``--lora-rank``: load the frozen base from
  ``--pretrained-checkpoint`` (``model_checkpoint.load_model``: tensors only, any TP / PP),
  ``apply_lora``, ``--lora-load``, adapter-only checkpoints.

Checkpoints. Megatron-LM's ``load_checkpoint`` reads ONE directory: ``--load``, or, when that holds
no checkpoint yet, ``--pretrained-checkpoint`` as a fine-tuning start. A LoRA resume needs two, the
base and the adapter. So the model provider loads the base on every start and takes
``--pretrained-checkpoint`` away from Megatron-LM; the model then shows Megatron-LM only its LoRA
factors, and Megatron-LM's own ``save_checkpoint`` / ``load_checkpoint`` write and resume
adapter-only checkpoints in ``--save`` / ``--load``, with optimizer, scheduler, RNG and iteration.
Read against Megatron-LM core_r0.13.0 .. core_r0.16.x (``pretrain``'s signature; ``get_model``
calls the provider once per virtual-pipeline chunk, before the DDP / Float16Module wrappers).

Nothing here imports megatron at module level: the wrapper first puts the checkout on sys.path
so that ITS ``megatron.core`` is the one imported.
"""

import functools
import inspect

import torch.distributed as dist

def lora_pretrain(pretrain):
    """``megatron.training.pretrain`` with the LoRA args provider and model provider swapped in."""
    from megatron_lora.training.arguments import add_lora_args

    signature = inspect.signature(pretrain)
    if "extra_args_provider" not in signature.parameters:
        raise SystemExit(
            "pretrain_gpt_lora.py: this Megatron-LM's pretrain() takes no extra_args_provider (core_r0.18 "
            "and later parse the arguments in pretrain_gpt.py's __main__ and pass a config container), so "
            "the --lora-* flags cannot be added. Use a core_r0.13.0 .. core_r0.16.x checkout.")

    @functools.wraps(pretrain)
    def wrapped(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.arguments["model_provider"] = lora_model_provider(call.arguments["model_provider"])
        call.arguments["extra_args_provider"] = chain_args_providers(
            call.arguments.get("extra_args_provider"), add_lora_args)
        return pretrain(*call.args, **call.kwargs)

    return wrapped


def chain_args_providers(*providers):
    """One Megatron ``extra_args_provider`` that applies each given one (None skipped) in order."""
    providers = [p for p in providers if p is not None]

    def provider(parser):
        for add_args in providers:
            parser = add_args(parser)
        return parser

    return provider


def lora_model_provider(model_provider):
    """The fork's ``model_provider``, plus LoRA when ``--lora-rank`` is given (else unchanged)."""

    @functools.wraps(model_provider)
    def provider(*args, **kwargs):
        from megatron.training import get_args
        from megatron_lora import apply_lora
        from megatron_lora.training.arguments import lora_config_from_args
        from megatron_lora.core.checkpoint.adapter import load_full_adapter
        from megatron_lora.core.checkpoint.model import load_model

        model = model_provider(*args, **kwargs)
        margs = get_args()
        cfg = lora_config_from_args(margs)
        if cfg is None:
            return model
        check_supported(margs)
        base = take_base_checkpoint(margs)
        if base is not None:
            load_model(model, base)  # before apply_lora: the keys are the base's own
        elif (not dist.is_initialized() or dist.get_rank() == 0):
            print("WARNING: --lora-rank without --pretrained-checkpoint: the frozen base keeps its random "
                  "initialisation. Pass the base model's checkpoint directory as --pretrained-checkpoint.",
                  flush=True)
        apply_lora(model, cfg)
        if margs.lora_load:  # a resume from --load overwrites it later, as it should
            # One virtual-pipeline chunk holds only some layers: check unexpected names per model only.
            load_full_adapter(model, margs.lora_load,
                              strict=getattr(margs, "virtual_pipeline_model_parallel_size", None) is None)
        return adapter_only_checkpoints(model)

    return provider


def check_supported(args) -> None:
    """Refuse the Megatron-LM flags this wrapper does not handle, naming the flag and the fix."""
    if getattr(args, "ckpt_format", "torch_dist") != "torch_dist":
        raise ValueError(f"--ckpt-format {args.ckpt_format}: adapter-only checkpoints need torch_dist "
                         "(Megatron-LM's default); drop the flag.")
    refused = {
        "init_model_with_meta_device": "the base is loaded into the model as it is built, off the meta device",
        "use_torch_fsdp2": "LoRA is tested with Megatron's DDP (and distributed optimizer) only",
        "use_megatron_fsdp": "LoRA is tested with Megatron's DDP (and distributed optimizer) only",
        "lora_save_merged": "this wrapper does not write merged checkpoints yet",
    }
    for name, why in refused.items():
        if getattr(args, name, None):
            raise ValueError(f"--{name.replace('_', '-')} is not supported with --lora-rank: {why}.")


def take_base_checkpoint(args):
    """``--pretrained-checkpoint``, moved to ``args.lora_base_checkpoint`` on the first call.

    Megatron-LM's ``load_checkpoint`` would otherwise load it as the whole model whenever ``--load``
    holds no checkpoint yet, and fail on the LoRA factors a base checkpoint does not have. The
    saved ``args`` keep the base's path. Called once per virtual-pipeline chunk.
    """
    if not hasattr(args, "lora_base_checkpoint"):
        args.lora_base_checkpoint, args.pretrained_checkpoint = args.pretrained_checkpoint, None
    return args.lora_base_checkpoint


def adapter_only_checkpoints(model):
    """Show Megatron-LM's ``save_checkpoint`` / ``load_checkpoint`` only the LoRA factors of ``model``.

    Both call the unwrapped model's ``sharded_state_dict`` (through ``generate_state_dict``), so a
    save writes the adapter only, and the optimizer state of exactly the trainable parameters. A
    resume then hands ``load_state_dict`` the adapter only; it is checked strictly against the
    model's LoRA factors. The frozen base comes from ``--pretrained-checkpoint`` on every start.
    """
    from megatron_lora.core.layers import is_lora_key

    full_sharded_state_dict, full_load_state_dict = model.sharded_state_dict, model.load_state_dict
    adapter = {name for name, _ in model.named_parameters() if is_lora_key(name)}

    def sharded_state_dict(prefix="", sharded_offsets=(), metadata=None):
        full = full_sharded_state_dict(prefix, sharded_offsets, metadata)
        return {key: value for key, value in full.items() if is_lora_key(key)}

    def load_state_dict(state_dict, strict=True):
        missing, unexpected = sorted(adapter - set(state_dict)), sorted(set(state_dict) - adapter)
        if strict and (missing or unexpected):
            raise RuntimeError(f"adapter checkpoint does not fit the model: missing {missing[:4]}, unexpected "
                               f"{unexpected[:4]}; use the --lora-* flags of the run that saved it.")
        return full_load_state_dict(state_dict, strict=False)

    model.sharded_state_dict, model.load_state_dict = sharded_state_dict, load_state_dict
    return model
