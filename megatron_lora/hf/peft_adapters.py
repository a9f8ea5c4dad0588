"""PEFT LoRA adapters <-> megatron_lora full adapters, exactly (pure tensor code, no peft import).

A *full adapter* holds logical (TP=1) factors keyed ``decoder.layers.N.<module>.lora_A|lora_B``
under ONE ``LoRAConfig`` (one rank R, one alpha); a PEFT adapter for ``LlamaForCausalLM`` holds
``base_model.model.model.layers.N.<self_attn|mlp>.<proj>.lora_A|lora_B.weight`` per projection.

**Import (PEFT -> Megatron).** PEFT gives q, k and v (gate and up) their own A; Megatron fuses
them into one layer with one A. One rank-r A cannot hold three different A's, so they are
stacked, with a block-structured B::

    A = [A_q; A_k; A_v]                                          [3r, h]
    B = fuse_qkv([B_q 0 0], [0 B_k 0], [0 0 B_v])                [(H + 2G)·d, 3r]
    s·B·A = fuse_qkv(s·B_q·A_q, s·B_k·A_k, s·B_v·A_v)            exactly: the zero blocks add exact zeros

A's that are bitwise equal (our own exports share one A) are stored once, so such an adapter keeps
rank r. ``LoRAConfig`` has one rank, so every target is zero-padded to the largest rank needed,
R (3r for distinct q/k/v A's, 2r for gate/up): zero rows of A, zero columns of B, exact.
A projection the PEFT adapter leaves out gets zero rows of B (exactly no update); a fused layer
it leaves out entirely (``layers_to_transform``, or q/k/v all absent) gets A = B = 0, which also
stays zero if trained further.

**Alpha rule.** Megatron scales by alpha/R (alpha/sqrt(R) with rsLoRA), PEFT by
s = lora_alpha/r (lora_alpha/sqrt(r) with use_rslora). When R == r, PEFT's lora_alpha and
use_rslora are kept; otherwise alpha = s·R and use_rslora = False. Either way the scale is s and
B is copied bit for bit.

**Export (Megatron -> PEFT).** q/k/v (gate/up) each get the shared A and their own rows of B,
de-interleaved. Rank components that contribute nothing to a projection (a zero column of its B
or a zero row of A) are dropped per projection, and all projections are zero-padded to the
largest remaining count r_out, so one PEFT ``r`` fits all: importing then exporting returns the
original PEFT factors. lora_alpha is kept when r_out == R, else it is s·r_out (use_rslora False).
``compact=False`` (``--keep-rank``) keeps R; an untrained adapter (B = 0) keeps R and its A's.

**Per-projection LoRA** (``LoRAConfig.per_projection``, ``core/projections.py``). A fused layer
carries PEFT's own factors: ``A = [A_q; A_k; A_v]`` (``[A_gate; A_up]``) and the compact
``B = fuse_qkv(B_q, B_k, B_v)`` (``[B_gate; B_up]``), each of rank r, so import keeps PEFT's r,
lora_alpha and use_rslora, and export cuts A into its blocks and B into its rows: rank r per
projection however the adapter was trained (``compact`` then only drops unused components as
above). An absent projection gets a zero A block and zero B rows, which stay zero in training.
"""

from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Tuple

import torch

from megatron_lora.core.config import DEFAULT_TARGET_MODULES, LoRAConfig
from megatron_lora.hf.mapping import LORA_TARGET_OF_PART, MODULE_OF_TARGET, MODULES, Arch, ConversionError

PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight$")
PARENT_OF_PART = {part: parent for parent, parts in MODULES.values() for part in parts}

# adapter_config.json fields whose non-default value changes what the factors mean: (field, default, why)
_UNSUPPORTED = (
    ("use_dora", False, "DoRA adds a magnitude vector Megatron LoRA layers do not have"),
    ("bias", "none", "LoRA bias terms are not part of megatron_lora adapters"),
    ("lora_bias", False, "LoRA bias terms are not part of megatron_lora adapters"),
    ("modules_to_save", None, "fully trained extra modules (modules_to_save) are not adapters"),
    ("fan_in_fan_out", False, "fan_in_fan_out (Conv1D / GPT-2 style weights) is not a Llama layout"),
    ("rank_pattern", {}, "per-module ranks (rank_pattern) are not supported; retrain with one r"),
    ("alpha_pattern", {}, "per-module alphas (alpha_pattern) are not supported; retrain with one lora_alpha"),
    ("layer_replication", None, "layer_replication changes the model's layer count"),
    ("trainable_token_indices", None, "trainable token embeddings are not adapters of the linears"),
    ("target_parameters", None, "LoRA on raw parameters (target_parameters) is not supported"),
    ("alora_invocation_tokens", None, "activated LoRA (alora_invocation_tokens) is not supported"),
    ("use_qalora", False, "QA-LoRA is not supported"),
)


def peft_key(layer: int, part: str, factor: str) -> str:
    return f"base_model.model.model.layers.{layer}.{PARENT_OF_PART[part]}.{part}.{factor}.weight"


def full_key(layer: int, module: str, factor: str) -> str:
    return f"decoder.layers.{layer}.{module}.{factor}"


def check_peft_config(cfg: dict, where: str = "adapter_config.json") -> float:
    """Refuse what cannot be represented exactly; returns PEFT's scale s."""
    if cfg.get("format") == "megatron_lora.adapter":
        raise ConversionError(f"{where} belongs to a megatron_lora adapter checkpoint, not a PEFT adapter; "
                              "use megatron-to-peft to export it.")
    if cfg.get("peft_type") != "LORA":
        raise ConversionError(f"{where}: peft_type {cfg.get('peft_type')!r}; "
                              "only LoRA adapters (peft_type 'LORA') convert.")
    for field, default, why in _UNSUPPORTED:
        value = cfg.get(field, default)
        if value in (default, None) or (isinstance(value, (list, tuple, dict)) and not value):
            continue
        raise ConversionError(f"{where}: {field}={value!r}: {why}.")
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        unknown = sorted(set(targets) - set(LORA_TARGET_OF_PART))
        if unknown:
            raise ConversionError(f"{where}: target_modules {unknown} are not Llama projections that map to "
                                  f"Megatron LoRA layers; supported: {sorted(LORA_TARGET_OF_PART)}.")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConversionError(f"{where}: r {r!r} / lora_alpha {alpha!r} must be positive numbers.")
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _peft_factors(tensors: Dict[str, torch.Tensor], r: int, arch: Arch, where: str):
    """{(layer, part): (A, B)} with every key, pairing and shape checked."""
    shapes = arch.part_shapes()
    found: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = PEFT_KEY.match(key)
        if not m or m.group(3) not in LORA_TARGET_OF_PART or PARENT_OF_PART[m.group(3)] != m.group(2):
            raise ConversionError(
                f"{where}: tensor {key!r} is not a LoRA factor of a Llama projection "
                f"({', '.join(sorted(LORA_TARGET_OF_PART))}); embeddings, lm_head, biases and DoRA "
                "magnitudes cannot be converted.")
        layer, part, factor = int(m.group(1)), m.group(3), m.group(4)
        if layer >= arch.num_layers:
            raise ConversionError(f"{where}: {key} is for layer {layer}, the model has {arch.num_layers} layers; "
                                  "check --base.")
        out_features, in_features = shapes[part]
        expected = (r, in_features) if factor == "A" else (out_features, r)
        if tuple(tensor.shape) != expected:
            raise ConversionError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {expected} "
                                  f"(r={r}, {part} of the base is [{out_features}, {in_features}]); the adapter "
                                  "belongs to another model (check --base) or uses per-module ranks.")
        found.setdefault((layer, part), {})[factor] = tensor
    for (layer, part), pair in found.items():
        if len(pair) != 2:
            raise ConversionError(f"{where}: layer {layer} {part} has lora_{''.join(pair)} but not both factors.")
    if not found:
        raise ConversionError(f"{where}: no LoRA factors found.")
    return {k: (v["A"], v["B"]) for k, v in found.items()}


def megatron_from_peft(tensors: Dict[str, torch.Tensor], peft_config: dict, arch: Arch,
                       where: str = "the PEFT adapter",
                       per_projection: bool = False) -> Tuple[Dict[str, torch.Tensor], LoRAConfig]:
    """A full adapter and its LoRAConfig whose update equals the PEFT adapter's (module docstring);
    ``per_projection``: for a per-projection model, at PEFT's rank."""
    scale = check_peft_config(peft_config, where)
    r = peft_config["r"]
    factors = _peft_factors(tensors, r, arch, where)
    targets = [t for t in DEFAULT_TARGET_MODULES if any(LORA_TARGET_OF_PART[p] == t for _, p in factors)]
    join = _per_projection if per_projection else _stack
    module_factors: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in range(arch.num_layers):
        for target in targets:
            module = MODULE_OF_TARGET[target]
            parts = [factors.get((layer, p)) for p in MODULES[module][1]]
            module_factors[(layer, module)] = join(module, parts, arch, r)
    rank = max(b.shape[1] for _, b in module_factors.values())  # per-projection: r (A stacks r rows per projection)
    out = {}
    for (layer, module), (a, b) in module_factors.items():
        pad = rank - b.shape[1]
        out[full_key(layer, module, "lora_A")] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        out[full_key(layer, module, "lora_B")] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1).contiguous()
    if rank == r:
        alpha, rslora = peft_config["lora_alpha"], bool(peft_config.get("use_rslora"))
    else:
        alpha, rslora = scale * rank, False
    cfg = LoRAConfig(rank=rank, alpha=alpha, use_rslora=rslora, target_modules=tuple(targets),
                     dropout=float(peft_config.get("lora_dropout") or 0.0), per_projection=per_projection)
    return out, cfg


def _per_projection(module: str, parts: List[Optional[Tuple[torch.Tensor, torch.Tensor]]], arch: Arch, r: int):
    """(A, B) of one per-projection layer: the parts' A's stacked, their B's fused (compact, rank r);
    an absent part is zero. Every part has rank r (``_peft_factors`` checked the shapes)."""
    shapes = arch.part_shapes()
    names = MODULES[module][1]
    dtype = next((p[1].dtype for p in parts if p is not None), torch.float32)
    a_blocks = [p[0] if p is not None else torch.zeros(r, shapes[n][1], dtype=dtype) for n, p in zip(names, parts)]
    b_parts = [p[1] if p is not None else torch.zeros(shapes[n][0], r, dtype=dtype) for n, p in zip(names, parts)]
    return torch.cat(a_blocks), arch.fuse(module, b_parts)


def _stack(module: str, parts: List[Optional[Tuple[torch.Tensor, torch.Tensor]]], arch: Arch, r: int):
    """(A, B) of one fused layer: distinct A's stacked, B block-structured, absent parts zero."""
    shapes = arch.part_shapes()
    names = MODULES[module][1]
    present = [p for p in parts if p is not None]
    if not present:  # a layer the adapter skips: an exact zero update
        out_features, in_features = arch.module_shape(module)
        return torch.zeros(1, in_features), torch.zeros(out_features, 1)
    blocks: List[torch.Tensor] = []  # distinct A's, in part order
    where_a: List[Optional[int]] = []
    for part in parts:
        if part is None:
            where_a.append(None)
            continue
        index = next((i for i, a in enumerate(blocks) if torch.equal(a, part[0])), None)
        if index is None:
            blocks.append(part[0])
            index = len(blocks) - 1
        where_a.append(index)
    offsets = [sum(b.shape[0] for b in blocks[:i]) for i in range(len(blocks))]
    width = sum(b.shape[0] for b in blocks)
    dtype = present[0][1].dtype
    b_parts = []
    for name, part, index in zip(names, parts, where_a):
        b = torch.zeros(shapes[name][0], width, dtype=dtype)
        if part is not None:
            b[:, offsets[index]:offsets[index] + part[1].shape[1]] = part[1]
        b_parts.append(b)
    return torch.cat(blocks), arch.fuse(module, b_parts)


def peft_from_megatron(tensors: Dict[str, torch.Tensor], cfg: LoRAConfig, arch: Arch, compact: bool = True,
                       base_model_name_or_path: Optional[str] = None, where: str = "the adapter"):
    """(PEFT tensors, adapter_config dict) with the same update as the full adapter (module docstring)."""
    unknown = sorted(set(cfg.target_modules) - set(MODULE_OF_TARGET))
    if unknown:
        raise ConversionError(f"{where}: LoRA targets {unknown} have no Llama projection; "
                              f"exportable targets: {sorted(MODULE_OF_TARGET)}.")
    expected = {}
    for layer in range(arch.num_layers):
        for target in cfg.target_modules:
            module = MODULE_OF_TARGET[target]
            out_features, in_features = arch.module_shape(module)
            expected[full_key(layer, module, "lora_A")] = (_projections(cfg, module) * cfg.rank, in_features)
            expected[full_key(layer, module, "lora_B")] = (out_features, cfg.rank)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {v})" for k, v in expected.items()
             if k in tensors and tuple(tensors[k].shape) != v]
    if missing or extra or wrong:
        raise ConversionError(f"{where} does not fit the base model (check --base): "
                              f"missing {missing[:3]}, unexpected {extra[:3]}, wrong shapes {wrong[:3]}.")
    per_part = {}  # (layer, part) -> (A [R, in], B [out, R])
    for layer in range(arch.num_layers):
        for target in cfg.target_modules:
            module = MODULE_OF_TARGET[target]
            a, b = tensors[full_key(layer, module, "lora_A")], tensors[full_key(layer, module, "lora_B")]
            a_parts = a.chunk(_projections(cfg, module)) if cfg.per_projection else None
            for i, (part, b_part) in enumerate(zip(MODULES[module][1], arch.split(module, b))):
                per_part[(layer, part)] = (a_parts[i] if a_parts else a, b_part)
    keep = {k: (b.ne(0).any(0) & a.ne(0).any(1)).nonzero().flatten() for k, (a, b) in per_part.items()}
    r_out = max(len(idx) for idx in keep.values()) if compact else cfg.rank
    if r_out == 0:  # an untrained adapter (B = 0): keep its A's for further training
        r_out, compact = cfg.rank, False
    out = {}
    for (layer, part), (a, b) in per_part.items():
        if compact:
            idx = keep[(layer, part)]
            pad = r_out - len(idx)
            a = torch.cat([a[idx], a.new_zeros(pad, a.shape[1])])
            b = torch.cat([b[:, idx], b.new_zeros(b.shape[0], pad)], dim=1)
        out[peft_key(layer, part, "lora_A")] = a.contiguous()
        out[peft_key(layer, part, "lora_B")] = b.contiguous()
    if r_out == cfg.rank:
        alpha, rslora = cfg.alpha, cfg.use_rslora
    else:
        alpha, rslora = cfg.scaling * r_out, False
    parts = [p for t in cfg.target_modules for p in MODULES[MODULE_OF_TARGET[t]][1]]
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r_out,
                  lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
                  lora_dropout=cfg.dropout, use_rslora=rslora, target_modules=parts, bias="none",
                  fan_in_fan_out=False, use_dora=False, modules_to_save=None, init_lora_weights=True,
                  rank_pattern={}, alpha_pattern={}, layers_to_transform=None, layers_pattern=None,
                  inference_mode=True, base_model_name_or_path=base_model_name_or_path)
    return out, config


def _projections(cfg: LoRAConfig, module: str) -> int:
    """How many A's the layer stacks: its projections under per-projection LoRA, else one."""
    return len(MODULES[module][1]) if cfg.per_projection else 1
