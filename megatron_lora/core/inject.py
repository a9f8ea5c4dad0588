"""Putting LoRA into a model: a spec rewrite (preferred) or in-place surgery on a built model.

Both paths end in ``apply_lora``, which initialises every LoRA layer TP-aware under its global
name (so A does not depend on the PP layout), freezes all non-LoRA parameters, and logs a summary.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import logging
import sys
from typing import Dict, Iterator, List

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_lora.core import expert_sharing, recompute
from megatron_lora.core.config import LoRAConfig, target_names
from megatron_lora.core.init import init_lora_factors
from megatron_lora.core.layers import (
    LoRAColumnParallelLinear, LoRALayerMixin, LoRARowParallelLinear, is_gated_fc1, is_qkv,
)
from megatron_lora.core.router import LoRATopKRouter

logger = logging.getLogger(__name__)

_LORA_FOR_BASE = {ColumnParallelLinear: LoRAColumnParallelLinear, RowParallelLinear: LoRARowParallelLinear,
                  TopKRouter: LoRATopKRouter}
_LORA_TYPES = (LoRALayerMixin,)
TRANSFORMER_IMPLS = ("local", "transformer_engine")


def lora_classes() -> dict:
    """Base class -> LoRA class. TE layers join only where Transformer Engine is already loaded
    (a model can hold TE layers only then), so the local / CPU path never imports it."""
    classes = dict(_LORA_FOR_BASE)
    if "transformer_engine" in sys.modules:
        try:
            from megatron_lora.core.te_layers import LORA_FOR_TE_BASE
        except ImportError:  # TE present but unusable (no CUDA): its layers cannot exist either
            pass
        else:
            classes.update(LORA_FOR_TE_BASE)
    return classes


# ------------------------------------------------------------------------------------ spec path

def lora_layer_spec(spec, cfg: LoRAConfig):
    """A copy of a Megatron ``ModuleSpec`` whose target parallel linears are LoRA layers.

    Works on any spec tree (GPT layer, block, MoE experts): every submodule field named in
    ``cfg.target_modules`` (by itself or scoped by the field holding it, ``experts.linear_fc1``)
    that holds a ColumnParallelLinear / RowParallelLinear is swapped.
    """
    found = set()
    new = _rewrite(copy.copy(spec), cfg, found, lora_classes())
    if not found:
        raise ValueError(
            f"lora_layer_spec: none of {list(cfg.target_modules)} is a Megatron-Core or Transformer "
            "Engine parallel linear in this spec (ColumnParallelLinear, RowParallelLinear, "
            "TELayerNormColumnParallelLinear, TEColumnParallelLinear, TERowParallelLinear)."
        )
    return new


def megatron_gpt_layer_spec(transformer_impl: str = "local", **spec_kwargs) -> ModuleSpec:
    """Megatron's own GPT layer spec: "local" (``get_gpt_layer_local_spec``, runs anywhere) or
    "transformer_engine" (``get_gpt_layer_with_transformer_engine_spec``: CUDA + TE)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_impl == "local":
        return gpt_layer_specs.get_gpt_layer_local_spec(**spec_kwargs)
    if transformer_impl == "transformer_engine":
        importlib.import_module("megatron_lora.core.te_layers")  # a clear ImportError without TE
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**spec_kwargs)
    raise ValueError(f"transformer_impl must be one of {TRANSFORMER_IMPLS}, got {transformer_impl!r}.")


def get_gpt_lora_layer_spec(cfg: LoRAConfig, transformer_impl: str = "local", **spec_kwargs) -> ModuleSpec:
    """Megatron's GPT layer spec (``megatron_gpt_layer_spec``) with LoRA on ``cfg.target_modules``."""
    return lora_layer_spec(megatron_gpt_layer_spec(transformer_impl, **spec_kwargs), cfg)


def _rewrite(node, cfg, found, classes, name=None, scope=None):
    """``name``: the field holding ``node``; ``scope``: the field holding the nearest enclosing
    module spec (a target's scope: ``experts`` for ``experts.linear_fc1``)."""
    path = f"{scope}.{name}" if scope and name else name
    if isinstance(node, ModuleSpec):
        base = node.module
        if name and cfg.targets(path) and base in classes:
            found.add(name)
            return dataclasses.replace(node, module=classes[base], params={**node.params, "lora_config": cfg})
        if node.submodules is not None:
            node = dataclasses.replace(node, submodules=_rewrite(node.submodules, cfg, found, classes, None, name))
        return node
    if isinstance(node, type):
        if name and cfg.targets(path) and node in classes:
            found.add(name)
            if hasattr(classes[node], "for_spec"):  # called by its holder itself (grouped experts)
                return classes[node].for_spec(cfg)
            return ModuleSpec(module=classes[node], params={"lora_config": cfg})
        return node
    if dataclasses.is_dataclass(node):
        changes = {f.name: _rewrite(getattr(node, f.name), cfg, found, classes, f.name, scope)
                   for f in dataclasses.fields(node)}
        return dataclasses.replace(node, **changes)
    if isinstance(node, functools.partial):
        # megatron-core 0.19 builds the MLP as partial(MLP.as_mlp_submodule, submodules=...)
        args = [_rewrite(a, cfg, found, classes, name, scope) for a in node.args]
        keywords = {k: _rewrite(v, cfg, found, classes, k, name) for k, v in node.keywords.items()}
        return functools.partial(node.func, *args, **keywords)
    if isinstance(node, (list, tuple)):
        return type(node)(_rewrite(n, cfg, found, classes, name, scope) for n in node)
    return node


# ----------------------------------------------------------------------------- built-model path

def global_module_names(model: torch.nn.Module) -> Dict[torch.nn.Module, str]:
    """Qualified names with GLOBAL indices: each transformer layer's ``layer_number - 1`` and each
    expert's index among all experts of its layer (``SequentialMLP``: EP rank x local experts).

    Under PP every stage numbers its local layers from 0, and under EP every expert rank numbers
    its local experts from 0; the global indices make the LoRA seed, and so A, independent of the
    pipeline and expert-parallel layout.
    """
    names = {}

    def walk(module, prefix, expert_offset=None):
        for child_name, child in module.named_children():
            part = child_name
            layer_number = getattr(child, "layer_number", None)
            if child_name.isdigit() and isinstance(layer_number, int):
                part = str(layer_number - 1)
            elif child_name.isdigit() and expert_offset is not None:
                part = str(int(child_name) + expert_offset)
            name = f"{prefix}{part}"
            names[child] = name
            walk(child, name + ".", _local_expert_offset(module) if child_name == "local_experts" else None)

    walk(model, "")
    return names


def _local_expert_offset(experts: torch.nn.Module) -> int:
    """Global index of a ``SequentialMLP``'s first local expert (Megatron's own rule: experts are
    split evenly and in order over the expert-parallel group)."""
    group = getattr(experts, "ep_group", None)
    if group is None:  # megatron-core 0.13 keeps no group on the module
        from megatron.core import parallel_state

        rank = parallel_state.get_expert_model_parallel_rank()
    else:
        rank = group.rank()
    return rank * experts.num_local_experts


def apply_lora(model, cfg: LoRAConfig):
    """Add LoRA to ``cfg.target_modules`` in place, initialise it, freeze the rest; returns model.

    Accepts a module or a list of modules (virtual-pipeline model chunks). Call it before wrapping
    the model in DDP. Base weights are not copied: base layers are turned into LoRA layers in place.
    A model built from ``lora_layer_spec`` already holds LoRA layers; this then initialises them.
    ``cfg.expert_adapters == "shared"``: each MoE layer's experts share one adapter (``expert_sharing``).
    """
    chunks = model_chunks(model)
    wrapped: Dict[str, int] = {}
    classes = lora_classes()
    for chunk in chunks:
        _check_targets(chunk, cfg, classes)
        names = global_module_names(chunk)
        for module, name in list(names.items()):
            leaf = name.rsplit(".", 1)[-1]
            if not cfg.targets(name):
                continue
            if isinstance(module, _LORA_TYPES):
                if module.lora_config != cfg:
                    raise ValueError(f"{name} already has LoRA with {module.lora_config}, not {cfg}.")
            else:
                classes[type(module)].from_base(module, cfg, gated=is_gated_fc1(module.config, leaf), qkv=is_qkv(leaf))
            if module.lora_init_name is None and not expert_sharing.is_shared_expert_name(cfg, name):
                init_lora_factors(module, name)
            wrapped[leaf] = wrapped.get(leaf, 0) + 1
        if cfg.expert_adapters == "shared":
            expert_sharing.share(chunk, names)
        if cfg.recompute_branch_input:
            _attach_recompute_sources(chunk, names)
        _freeze_all_but_lora(chunk)
        _keep_recompute_differentiable(chunk)
    trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    total = sum(p.numel() for c in chunks for p in c.parameters())
    logger.info("LoRA r=%d alpha=%g on %s; trainable %d / %d parameters on this rank (%.3f%%)",
                cfg.rank, cfg.alpha, dict(sorted(wrapped.items())), trainable, total,
                100.0 * trainable / max(total, 1))
    return model


def _check_targets(model: torch.nn.Module, cfg: LoRAConfig, classes: dict) -> None:
    available, unsupported = set(), {}
    for name, module in model.named_modules():
        if type(module) in classes or isinstance(module, _LORA_TYPES):
            available.update(target_names(name))
        elif isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or (
                cfg.targets(name) and "Linear" in type(module).__name__):
            unsupported.update(dict.fromkeys(target_names(name), type(module).__name__))
    bad = {t: unsupported[t] for t in cfg.target_modules if t in unsupported and t not in available}
    if bad:
        raise TypeError(
            f"LoRA targets {bad} are not Megatron-Core ColumnParallelLinear / RowParallelLinear or "
            "Transformer Engine TELayerNormColumnParallelLinear / TEColumnParallelLinear / "
            "TERowParallelLinear (custom subclasses are not supported). Build the model with "
            "get_gpt_lora_layer_spec, or drop these targets."
        )
    cfg.check_targets_exist(available)


def _attach_recompute_sources(chunk: torch.nn.Module, names: dict) -> None:
    """``recompute_branch_input``: give the local LoRA layers their producers (``recompute.py``)."""
    local = (LoRAColumnParallelLinear, LoRARowParallelLinear, LoRATopKRouter)  # the router keeps its input
    foreign = sorted({type(m).__name__ for m in chunk.modules() if isinstance(m, _LORA_TYPES)
                      and not isinstance(m, local)})
    if foreign:
        raise ValueError(
            f"recompute_branch_input (--lora-recompute-branch-input) works on the local layer spec's "
            f"LoRA layers; this model has {foreign}, Transformer Engine layers whose norm runs inside "
            "the layer or grouped experts, whose producer no source reads. Drop the option, or build "
            "the model with transformer_impl='local' (SequentialMLP experts).")
    recompute.attach_sources(chunk, names)


def _keep_recompute_differentiable(model: torch.nn.Module) -> None:
    """Make the embedding output require grad when Megatron recomputes from layer 0's input.

    Megatron's full recomputation is a reentrant checkpoint: with a frozen embedding none of its
    inputs requires grad, so its output has no grad_fn and backward fails. Its selective
    ``"layernorm"`` recomputation (``CheckpointWithoutOutput``) frees layer 0's norm output after
    forward and refills it from the inputs its autograd node saved; with no input requiring grad
    there is no node, nothing is saved, and backward fails (while the LoRA branch of
    ``linear_qkv`` needs that output). Marking the embedding output restores both (PEFT's
    enable_input_require_grads does the same); it costs only layer 0's input gradient, so it is
    done only when one of these recomputations is on.
    """
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding

    config = getattr(model, "config", None)
    granularity = getattr(config, "recompute_granularity", None)
    if not (granularity == "full" or (granularity == "selective"
                                      and "layernorm" in (getattr(config, "recompute_modules", None) or ()))):
        return
    for module in model.modules():
        if isinstance(module, LanguageModelEmbedding) and not getattr(module, "_lora_requires_grad_hook", None):
            module._lora_requires_grad_hook = module.register_forward_hook(
                lambda _module, _inputs, output: output.requires_grad_(True) if torch.is_grad_enabled() else output)


def _freeze_all_but_lora(model: torch.nn.Module) -> None:
    keep = {id(p) for p in lora_parameters(model)}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)


# -------------------------------------------------------------------------------- model helpers

def model_chunks(model) -> list:
    """A model, or its list of virtual-pipeline chunks, as a list of chunks."""
    return model if isinstance(model, list) else [model]


def lora_modules(model) -> Iterator[torch.nn.Module]:
    for chunk in model_chunks(model):
        yield from (m for m in chunk.modules() if isinstance(m, _LORA_TYPES))


def lora_parameters(model) -> List[torch.nn.Parameter]:
    """Every LoRA factor (and DoRA magnitude) once (experts sharing one adapter hold the same objects)."""
    params = {id(p): p for p in (getattr(m, f) for m in lora_modules(model) for f in m.lora_tensor_names())}
    return list(params.values())


def set_adapters_enabled(model, enabled: bool) -> None:
    """Switch every adapter on or off; off gives the exact base output."""
    for m in lora_modules(model):
        m.lora_enabled = enabled


@contextlib.contextmanager
def adapters_disabled(model):
    """``with adapters_disabled(model):`` runs the frozen base model (e.g. a reference loss)."""
    previous = [(m, m.lora_enabled) for m in lora_modules(model)]
    set_adapters_enabled(model, False)
    try:
        yield model
    finally:
        for m, enabled in previous:
            m.lora_enabled = enabled


def merge_lora(model) -> None:
    for m in lora_modules(model):
        m.merge()


def unmerge_lora(model) -> None:
    for m in lora_modules(model):
        m.unmerge()
