"""CPU mode for Megatron-LM's own training loop: ``MEGATRON_LORA_CPU=1`` (gloo, no GPU).

``megatron_lora.cpu.enable_cpu`` makes Megatron-Core run on the CPU (device placements, RNG
tracker, streams). Megatron-LM's ``megatron/training`` adds CUDA assumptions of its own, which
this module answers from the outside, without editing a Megatron-LM file:

==========================================  ==========================================================
Megatron-LM (core_v0.16.1 / core_v0.19.0)   answer on a host without CUDA
==========================================  ==========================================================
``initialize_megatron`` asserts CUDA        called with ``allow_no_cuda=True`` (its documented switch)
``torch.cuda.device_count()`` == 0 skips    1: ``_initialize_distributed`` then sets up model-parallel
the model-parallel state and RNG tracker    state, ``_set_random_seed`` Megatron's RNG tracker
``torch.cuda.set_device(local_rank)``       no-op (one CPU)
``torch.cuda.get_rng_state / set_rng_state``  the CPU generator's state (rerun state machine, every
                                            step; checkpoint RNG state)
``megatron.legacy.fused_kernels.load``      no-op: it runs nvcc (0.16; 0.19 has no ``legacy``)
``get_device_arch_version`` (TP > 1)        0, no GPU architecture; ``CUDA_DEVICE_MAX_CONNECTIONS``,
                                            required below Blackwell, defaults to 1 (no CUDA queues)
``datasets.utils.compile_helpers`` (make)   skipped when the wheel's built ``helpers_cpp`` imports
==========================================  ==========================================================

Use it with ``--distributed-backend gloo``, ``--transformer-impl local`` and the ``--no-*-fusion``
flags (fused kernels are CUDA). ``enable_megatron_lm_cpu`` is a strict no-op when CUDA is available:
nothing is patched and Megatron-LM runs exactly as it would without this module.
"""

import importlib
import os

import torch

ENV = "MEGATRON_LORA_CPU"
_ENABLED = False


def requested() -> bool:
    """True when the user asked for CPU mode (``MEGATRON_LORA_CPU=1``)."""
    return os.environ.get(ENV, "0") not in ("", "0")


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:  # e.g. megatron.legacy, gone in core_v0.19
        return None


def _allow_no_cuda(initialize_megatron):
    def initialize(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return initialize_megatron(*args, **kwargs)

    return initialize


def _compile_helpers_unless_built(compile_helpers):
    def compile_if_missing():
        if _optional("megatron.core.datasets.helpers_cpp") is None:
            compile_helpers()

    return compile_if_missing


def enable_megatron_lm_cpu() -> bool:
    """Answer Megatron-LM's CUDA assumptions on the CPU (see the module docstring for each).

    Call it after ``megatron.training`` is importable and before ``pretrain`` runs. Returns True
    when the answers are in place, False on a host with CUDA, where nothing is patched.
    """
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    _ENABLED = True
    from megatron_lora.cpu import enable_cpu

    enable_cpu()
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

    # Megatron-LM binds these names at import (``from ... import name``): patch each user module.
    initialize = importlib.import_module("megatron.training.initialize")
    allow_no_cuda = _allow_no_cuda(initialize.initialize_megatron)
    for name in ("megatron.training.training", "megatron.training.initialize", "megatron.training"):
        module = importlib.import_module(name)
        if getattr(module, "initialize_megatron", None) is not None:
            module.initialize_megatron = allow_no_cuda
    for name in ("megatron.training.utils", "megatron.training.arguments"):
        module = _optional(name)
        if module is not None and hasattr(module, "get_device_arch_version"):
            module.get_device_arch_version = lambda: 0
    fused_kernels = _optional("megatron.legacy.fused_kernels")
    if fused_kernels is not None:
        fused_kernels.load = lambda args: None
    datasets_utils = importlib.import_module("megatron.core.datasets.utils")
    datasets_utils.compile_helpers = _compile_helpers_unless_built(datasets_utils.compile_helpers)
    return True
