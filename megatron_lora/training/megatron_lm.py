"""Megatron-LM adoption: LoRA in a Megatron-LM checkout's own ``pretrain_gpt.py``, no file edited.

``patches/pretrain_gpt_lora.py`` runs the checkout's ``pretrain_gpt.py`` as ``__main__`` after
:func:`install`, which takes one of two routes by ``pretrain``'s signature. core_r0.18 and later
(``pretrain(cfg_container, ...)``): :func:`install_config_route`, Megatron-LM's own flag parsing
and the model config's ``pre_wrap_hooks``. core_r0.13 .. core_r0.17: ``megatron.training.pretrain``
is replaced with :func:`lora_pretrain`, which changes two arguments:

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
Both routes end in :func:`lora_model`, called once per virtual-pipeline chunk before the DDP /
Float16Module wrappers. Tested against the real core_v0.16.1 and core_v0.19.0
(``tests/distributed/test_megatron_lm_real.py``); :func:`megatron_lm_adapter` lets the converters
read the adapter checkpoints Megatron-LM saves this way.

Nothing here imports megatron at module level: the wrapper first puts the checkout on sys.path
so that ITS ``megatron.core`` is the one imported.
"""

import functools
import inspect

import torch.distributed as dist

def install() -> str:
    """Put LoRA into the imported ``megatron.training`` before ``pretrain_gpt.py`` runs; returns the route.

    - ``"model_provider"`` (core_r0.13 .. core_r0.17: ``pretrain`` takes ``extra_args_provider``):
      ``megatron.training.pretrain`` is replaced by :func:`lora_pretrain`.
    - ``"config"`` (core_r0.18 and later: ``pretrain(cfg_container, ...)``; ``pretrain_gpt.py``
      parses the flags itself and builds the model from the container's ``ModelConfig``):
      :func:`install_config_route`.
    """
    import importlib

    training = importlib.import_module("megatron.training")
    if "extra_args_provider" in inspect.signature(training.pretrain).parameters:
        training.pretrain = lora_pretrain(training.pretrain)  # pretrain_gpt.py imports it from here
        return "model_provider"
    install_config_route()
    return "config"


def install_config_route() -> None:
    """core_r0.18+: the ``--lora-*`` flags join Megatron-LM's own parsing, and LoRA is a pre-wrap hook.

    ``pretrain_gpt.py``'s ``__main__`` calls ``parse_and_validate_args(extra_args_provider=...)``
    and ``gpt_config_from_args(args)``, both imported by name from ``megatron.training.arguments`` /
    ``argument_utils``; each is wrapped here, before ``pretrain_gpt.py`` is run:

    - ``parse_and_validate_args``: its ``extra_args_provider`` (ModelOpt's, if any) chained with
      ``add_lora_args``, so Megatron-LM's parser validates and records the flags (saved ``args``);
    - ``gpt_config_from_args``: with ``--lora-rank``, :func:`lora_pre_wrap_hook` is appended to the
      ``ModelConfig``'s ``pre_wrap_hooks``, which the model builder applies to the built model
      chunks before Float16Module / DDP and so before the optimizer is built.

    Checkpoints then work as on the older route (``adapter_only_checkpoints``).
    """
    import importlib

    from megatron_lora.training.arguments import add_lora_args

    arguments = importlib.import_module("megatron.training.arguments")
    argument_utils = importlib.import_module("megatron.training.argument_utils")
    parse_and_validate_args, gpt_config_from_args = (arguments.parse_and_validate_args,
                                                     argument_utils.gpt_config_from_args)

    @functools.wraps(parse_and_validate_args)
    def parse_with_lora_args(extra_args_provider=None, *args, **kwargs):
        return parse_and_validate_args(chain_args_providers(extra_args_provider, add_lora_args), *args, **kwargs)

    @functools.wraps(gpt_config_from_args)
    def config_with_lora_hook(args, *rest, **kwargs):
        from megatron_lora.training.arguments import lora_config_from_args

        model_config = gpt_config_from_args(args, *rest, **kwargs)
        if lora_config_from_args(args) is not None:
            model_config.pre_wrap_hooks.append(lora_pre_wrap_hook)
        return model_config

    arguments.parse_and_validate_args = parse_with_lora_args
    argument_utils.gpt_config_from_args = config_with_lora_hook


def lora_pretrain(pretrain):
    """``megatron.training.pretrain`` with the LoRA args provider and model provider swapped in."""
    from megatron_lora.training.arguments import add_lora_args

    signature = inspect.signature(pretrain)
    if "extra_args_provider" not in signature.parameters:
        raise SystemExit(
            "pretrain_gpt_lora.py: this Megatron-LM's pretrain() takes no extra_args_provider (core_r0.18 "
            "and later parse the arguments in pretrain_gpt.py's __main__ and pass a config container); "
            "megatron_lm.install() takes the config route there.")

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
        return lora_model(model_provider(*args, **kwargs))

    return provider


def lora_pre_wrap_hook(model_chunks):
    """core_v0.18+: a ``ModelConfig.pre_wrap_hooks`` entry; :func:`lora_model` on each built model
    chunk (virtual-pipeline stage), before Float16Module / DDP wrap them."""
    return [lora_model(chunk) for chunk in model_chunks]


def lora_model(model):
    """One freshly built model chunk, plus LoRA when ``--lora-rank`` is given (else unchanged):
    the frozen base from ``--pretrained-checkpoint``, ``apply_lora``, ``--lora-load``,
    adapter-only checkpoints."""
    from megatron.training import get_args
    from megatron_lora import apply_lora
    from megatron_lora.training.arguments import lora_config_from_args
    from megatron_lora.core.checkpoint.adapter import load_full_adapter
    from megatron_lora.training.model_checkpoint import load_model

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
        "lora_plus_ratio": "Megatron-LM builds its own optimizer here; use pretrain_gpt_lora.py, or pass "
                           "megatron_lora.core.lora_plus.megatron_optimizer_kwargs to get_megatron_optimizer",
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


def megatron_lm_adapter(path: str, iteration=None):
    """``(iteration dir, LoRAConfig)`` of an adapter checkpoint this wrapper saved through Megatron-LM's
    ``save_checkpoint``, or None for any other path.

    Such a checkpoint is Megatron-LM's own (``latest_checkpointed_iteration.txt``, ``iter_XXXXXXX/``)
    with no descriptor file; the LoRA configuration is in the ``--lora-*`` flags of the ``args``
    that Megatron-LM keeps with it (``model_checkpoint.megatron_lm_common_state``). ``path``: the
    ``--save`` root or one iteration.
    """
    import os

    from megatron_lora.core.checkpoint import atomic_save
    from megatron_lora.training import model_checkpoint
    from megatron_lora.core.checkpoint.files import MODEL_TRACKER
    from megatron_lora.training.arguments import lora_config_from_args

    if iteration is not None:
        ckpt_dir = atomic_save.iteration_dir(path, iteration)
    elif os.path.exists(os.path.join(path, ".metadata")) or os.path.exists(os.path.join(path, MODEL_TRACKER)):
        ckpt_dir = model_checkpoint.resolve(path)
    else:
        return None
    if not os.path.exists(os.path.join(ckpt_dir, ".metadata")):
        return None
    args = (model_checkpoint.megatron_lm_common_state(ckpt_dir) or {}).get("args")
    cfg = lora_config_from_args(args) if args is not None else None
    return None if cfg is None else (ckpt_dir, cfg)


def load_megatron_lm_adapter(model, ckpt_dir: str) -> None:
    """Load the LoRA factors of a :func:`megatron_lm_adapter` checkpoint into ``model`` (LoRA applied,
    any TP / PP layout): the tensors only, requested with the checkpoint's content metadata."""
    from megatron.core import dist_checkpointing

    from megatron_lora.core.checkpoint import dist_state, pickle_screen
    from megatron_lora.core.checkpoint.adapter import lora_sharded_state_dict

    pickle_screen.check_common_state(ckpt_dir)
    sharded = lora_sharded_state_dict(model, metadata=dist_checkpointing.load_content_metadata(ckpt_dir))
    dist_state.copy_loaded(sharded, dist_state.load_dist({"model": sharded}, ckpt_dir)["model"])
