"""DoRA magnitudes between PEFT (``use_dora=True``) and megatron_lora full adapters (pure tensor code).

PEFT keeps one magnitude per adapted projection, ``base_model.model.model.layers.N.<self_attn|mlp>.
<proj>.lora_magnitude_vector`` ``[out_features]`` (no ``.weight`` suffix); a full adapter keeps one per
fused Megatron layer, ``decoder.layers.N.<module>.lora_magnitude`` ``[out]`` (docs/design.md §18).

DoRA's norm is taken per output row, ``n_o = ‖W_o + s·(B·A)_o‖``, and fusing only reorders rows:
``linear_qkv``'s row of q head h is q_proj's row, whatever the group interleaving (``Arch.fuse``),
and the stacked-A import gives it the same ``(B·A)_o`` (the zero blocks of B add exact zeros), as
does per-projection LoRA. So the fused magnitude is the projections' vectors fused with the row
mapping of B, and exporting splits it the same way. Rank compaction on export drops components that
add nothing to ``B·A``: no norm, and so no magnitude, changes.

A projection the PEFT adapter leaves out (q and v adapted, k not; a layer outside
``layers_to_transform``) has no magnitude; PEFT runs it as the base. Its rows get B = 0 and
``m = ‖W_o‖``, the base weight's norm (in fp64, as ``dora.init_magnitude`` computes it), so its
scale ``m / n`` is 1: those norms come from the base weights (``BaseNorms``, read from ``--base``
by ``sources.base_norms``); a base given only as its sizes (``model_args.json``) is refused naming the
projection.

Experts and the router: PEFT refuses ``use_dora`` on parameter targets (``target_parameters``),
its one format for transformers 5's fused experts and its router, and Megatron's DoRA refuses the
router; both directions refuse them, and the export points to merging instead.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from megatron_lora.hf.mapping import Arch, ConversionError, MODULES

Key = Tuple[int, str]  # (layer, PEFT projection)
BaseNorms = Callable[[List[Key]], Dict[Key, torch.Tensor]]  # the base weight's row norms, fp64 [out]
PEFT_SUFFIX = "lora_magnitude_vector"
MAGNITUDE_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_magnitude_vector$")
_PARENT_OF_PART = {part: parent for parent, parts in MODULES.values() for part in parts}
NO_EXPERTS = ("PEFT has no DoRA on experts or the router (it refuses use_dora with target_parameters); "
              "merge the adapter instead (merge --to hf, or export_merged)")


def peft_key(layer: int, part: str) -> str:
    return f"base_model.model.model.layers.{layer}.{_PARENT_OF_PART[part]}.{part}.{PEFT_SUFFIX}"


def check_config(cfg: dict, where: str) -> None:
    """What PEFT itself refuses next to ``use_dora`` (an edited config): parameter targets."""
    if cfg.get("use_dora") and cfg.get("target_parameters"):
        raise ConversionError(f"{where}: use_dora with target_parameters {cfg['target_parameters']!r}: {NO_EXPERTS}.")


def read(tensors: Dict[str, torch.Tensor], cfg: dict, arch: Arch,
         where: str) -> Tuple[Dict[str, torch.Tensor], Dict[Key, torch.Tensor]]:
    """(the tensors without magnitudes, ``{(layer, projection): magnitude}``), keys and shapes checked."""
    rest, found = {}, {}
    shapes = arch.part_shapes()
    for key, tensor in tensors.items():
        if not key.endswith("." + PEFT_SUFFIX):
            rest[key] = tensor
            continue
        if not cfg.get("use_dora"):
            raise ConversionError(f"{where}: {key} is a DoRA magnitude, but adapter_config.json has no use_dora=true; "
                                  "the config does not belong to these tensors.")
        m = MAGNITUDE_KEY.match(key)
        if not m or m.group(3) not in shapes or _PARENT_OF_PART.get(m.group(3)) != m.group(2):
            raise ConversionError(f"{where}: {key} is not a DoRA magnitude of an attention or dense MLP projection "
                                  f"({', '.join(_PARENT_OF_PART)}); {NO_EXPERTS}.")
        layer, part = int(m.group(1)), m.group(3)
        if layer >= arch.num_layers:
            raise ConversionError(f"{where}: {key} is for layer {layer}, the model has {arch.num_layers} layers; "
                                  "check --base.")
        if tuple(tensor.shape) != shapes[part][:1]:
            raise ConversionError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {shapes[part][:1]} "
                                  f"({part}'s output features); the adapter belongs to another model (check --base).")
        found[(layer, part)] = tensor
    return rest, found


def check_pairs(factors: Iterable[Key], magnitudes: Dict[Key, torch.Tensor], where: str) -> None:
    """Every adapted projection of a DoRA adapter has its magnitude, and every magnitude its factors."""
    factors = set(factors)
    experts = sorted(part for _, part in factors if part not in _PARENT_OF_PART)
    if experts:
        raise ConversionError(f"{where}: use_dora with LoRA on {experts[0]}: {NO_EXPERTS}.")
    for what, keys in (("LoRA factors but no lora_magnitude_vector", factors - set(magnitudes)),
                       ("a lora_magnitude_vector but no LoRA factors", set(magnitudes) - factors)):
        if keys:
            layer, part = min(keys, key=lambda k: (k[0], list(_PARENT_OF_PART).index(k[1])))  # the first in layer order
            raise ConversionError(f"{where}: use_dora: layer {layer} {part} has {what}; pass the adapter "
                                  "as save_pretrained wrote it.")


def with_base_norms(needed: List[Key], magnitudes: Dict[Key, torch.Tensor], base_norms: Optional[BaseNorms],
                    where: str) -> Dict[Key, torch.Tensor]:
    """``magnitudes`` and, for every ``needed`` projection the adapter leaves out, its base rows'
    norms in the magnitudes' dtype (the module docstring)."""
    absent = [k for k in needed if k not in magnitudes]
    if not absent:
        return magnitudes
    layer, part = absent[0]
    if base_norms is None:
        raise ConversionError(
            f"{where}: use_dora: the adapter has no magnitude for layer {layer} {part}, whose rows share a Megatron "
            "layer with adapted ones and keep the base weight's norm, which --base does not hold (only the model's "
            "sizes); pass --base as the Megatron checkpoint or the Hugging Face model directory.")
    dtype = next(iter(magnitudes.values())).dtype
    norms = base_norms(absent)
    return {**magnitudes, **{k: norms[k].to(dtype) for k in absent}}


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """``‖W_o‖`` per output row in fp64: ``dora.init_magnitude``'s sum, per projection."""
    return weight.detach().double().square().sum(dim=1).sqrt_()
