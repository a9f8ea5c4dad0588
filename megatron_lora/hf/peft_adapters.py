"""PEFT LoRA adapters <-> megatron_lora full adapters, exactly (pure tensor code, no peft import).

A *full adapter* holds logical (TP=1) factors keyed ``decoder.layers.N.<module>.lora_A|lora_B``
under ONE ``LoRAConfig`` (one rank R, one alpha); a PEFT adapter for ``LlamaForCausalLM`` (Qwen2,
Qwen3) holds ``base_model.model.model.layers.N.<self_attn|mlp>.<proj>.lora_A|lora_B.weight`` per
projection. Mixture-of-experts models (Qwen3-MoE, Mixtral) hold their experts and router in one
of PEFT's two expert formats, read into and written from one (A, B) per expert projection by
``peft_experts``; from there an expert's ``linear_fc1`` (parts gate, up) and ``linear_fc2``
(down) and the router (``mlp.router``) are fused layers like the dense ones (``adapter_modules``).

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

**Experts on export.** PEFT's fused format gives an expert's gate_up ONE A: it is the expert's
Megatron A (rank R), or, under per-projection LoRA with distinct gate and up A's, both stacked
with a block B (2R, as on import). Compaction runs per PEFT factor pair, so per expert and fused
parameter (gate_up, down) and per router, the same rule as above; the one r_out of the adapter
(PEFT's config has one r) is the largest count over attention projections, experts and routers,
and every other pair is zero-padded to it: exact. ``expert_layout="per_expert"`` writes each
expert projection as its own pair, compacted per projection like gate_proj / up_proj.

**Per-projection LoRA** (``LoRAConfig.per_projection``, ``core/projections.py``). A fused layer
carries PEFT's own factors: ``A = [A_q; A_k; A_v]`` (``[A_gate; A_up]``) and the compact
``B = fuse_qkv(B_q, B_k, B_v)`` (``[B_gate; B_up]``), each of rank r, so import keeps PEFT's r,
lora_alpha and use_rslora, and export cuts A into its blocks and B into its rows: rank r per
projection however the adapter was trained (``compact`` then only drops unused components as
above). An absent projection gets a zero A block and zero B rows, which stay zero in training.

**DoRA** (``use_dora=True``): each projection's ``lora_magnitude_vector`` is fused into the layer's
``lora_magnitude`` with B's row mapping and split back on export (``peft_dora``); a projection the
adapter leaves out keeps its base rows' norm, read from the base (``sources.base_norms``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_lora.core.config import DEFAULT_TARGET_MODULES, LoRAConfig, target_names
from megatron_lora.core.sharded_state import LORA_MAGNITUDE
from megatron_lora.hf import peft_dora, peft_experts
from megatron_lora.hf.mapping import MODULES, Arch, ConversionError

PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight$")
PARENT_OF_PART = {part: parent for parent, parts in MODULES.values() for part in parts}
TARGET_ORDER = DEFAULT_TARGET_MODULES + (peft_experts.ROUTER,)
QKV = "self_attention.linear_qkv"

# adapter_config.json fields whose non-default value changes what the factors mean: (field, default, why)
_UNSUPPORTED = (
    ("bias", "none", "LoRA bias terms are not part of megatron_lora adapters"),
    ("lora_bias", False, "LoRA bias terms are not part of megatron_lora adapters"),
    ("modules_to_save", None, "fully trained extra modules (modules_to_save) are not adapters"),
    ("fan_in_fan_out", False, "fan_in_fan_out (Conv1D / GPT-2 style weights) is not a Llama layout"),
    ("rank_pattern", {}, "per-module ranks (rank_pattern) are not supported; retrain with one r"),
    ("alpha_pattern", {}, "per-module alphas (alpha_pattern) are not supported; retrain with one lora_alpha"),
    ("layer_replication", None, "layer_replication changes the model's layer count"),
    ("trainable_token_indices", None, "trainable token embeddings are not adapters of the linears"),
    ("alora_invocation_tokens", None, "activated LoRA (alora_invocation_tokens) is not supported"),
    ("use_qalora", False, "QA-LoRA is not supported"),
)


@dataclass(frozen=True)
class AdapterModule:
    """One Megatron LoRA layer of a decoder layer and the PEFT projections its rows hold."""

    name: str  # under decoder.layers.N.: "self_attention.linear_qkv", "mlp.experts.local_experts.3.linear_fc1"
    target: str  # the LoRAConfig target that names it: "linear_qkv", "linear_fc1", "router"
    parts: Tuple[str, ...]  # PEFT projections in row order: "q_proj", ..., "experts.3.gate_proj", "router"


def adapter_modules(arch: Arch) -> List[AdapterModule]:
    """The LoRA layers of one decoder layer: attention, then the dense MLP or the experts and router."""
    dense = [AdapterModule(m, m.rsplit(".", 1)[1], parts) for m, (_, parts) in MODULES.items()]
    if not arch.num_experts:
        return dense
    attention = [m for m in dense if m.name.startswith("self_attention.")]
    return attention + [AdapterModule(*row) for row in peft_experts.expert_modules(arch)]


def part_shapes(arch: Arch) -> Dict[str, Tuple[int, int]]:
    """[out, in] of every part of ``adapter_modules(arch)``."""
    shapes = {**arch.part_shapes(), **(peft_experts.part_shapes(arch) if arch.num_experts else {})}
    return {p: shapes[p] for m in adapter_modules(arch) for p in m.parts}


def _fuse(arch: Arch, module: AdapterModule, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    return arch.fuse(QKV, blocks) if module.name == QKV else torch.cat(list(blocks)) if len(blocks) > 1 else blocks[0]


def _split(arch: Arch, module: AdapterModule, fused: torch.Tensor) -> List[torch.Tensor]:
    if module.name == QKV:
        return arch.split(QKV, fused)
    n = len(module.parts)
    return [p.contiguous() for p in fused.chunk(n, dim=0)] if n > 1 else [fused]


def peft_key(layer: int, part: str, factor: str) -> str:
    return f"base_model.model.model.layers.{layer}.{PARENT_OF_PART[part]}.{part}.{factor}.weight"


def full_key(layer: int, module: str, factor: str) -> str:
    return f"decoder.layers.{layer}.{module}.{factor}"


def _known_target_modules(arch: Optional[Arch]) -> set:
    if arch is None:
        return set(PARENT_OF_PART) | peft_experts.target_module_names(None)
    dense = {p for m in adapter_modules(arch) for p in m.parts if p in PARENT_OF_PART}
    return dense | (peft_experts.target_module_names(arch) if arch.num_experts else set())


def check_peft_config(cfg: dict, where: str = "adapter_config.json", arch: Optional[Arch] = None) -> float:
    """Refuse what cannot be represented exactly (for ``arch`` when given); returns PEFT's scale s."""
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
    peft_dora.check_config(cfg, where)
    if peft_experts.targeted_parameters(cfg, where) and arch is not None and not arch.num_experts:
        raise ConversionError(f"{where}: target_parameters {cfg['target_parameters']!r} adapt experts, but the "
                              f"model ({arch.model_type}) has none; check --base.")
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        known = _known_target_modules(arch)
        unknown = sorted(set(targets) - known)
        if unknown:
            model = f"{arch.model_type} " if arch is not None else ""
            raise ConversionError(f"{where}: target_modules {unknown} are not {model}projections that map to "
                                  f"Megatron LoRA layers; supported: {sorted(known)}.")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConversionError(f"{where}: r {r!r} / lora_alpha {alpha!r} must be positive numbers.")
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _peft_factors(tensors: Dict[str, torch.Tensor], config: dict, r: int, arch: Arch, where: str):
    """{(layer, part): (A, B)} with every key, pairing and shape checked."""
    factors = {}
    if arch.num_experts:  # the expert and router factors, in either expert layout
        factors, tensors = peft_experts.read(tensors, config, arch, r, where)
    shapes = part_shapes(arch)
    found: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = PEFT_KEY.match(key)
        if not m or m.group(3) not in shapes or PARENT_OF_PART.get(m.group(3)) != m.group(2):
            raise ConversionError(
                f"{where}: tensor {key!r} is not a LoRA factor of a {arch.model_type} projection "
                f"({', '.join(sorted(_known_target_modules(arch)))}); embeddings, lm_head and biases "
                "cannot be converted.")
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
    factors.update({k: (v["A"], v["B"]) for k, v in found.items()})
    if not factors:
        raise ConversionError(f"{where}: no LoRA factors found.")
    return factors


def megatron_from_peft(tensors: Dict[str, torch.Tensor], peft_config: dict, arch: Arch,
                       where: str = "the PEFT adapter", per_projection: bool = False,
                       base_norms: Optional[peft_dora.BaseNorms] = None) -> Tuple[Dict[str, torch.Tensor], LoRAConfig]:
    """A full adapter and its LoRAConfig whose update equals the PEFT adapter's (module docstring);
    ``per_projection``: for a per-projection model, at PEFT's rank. ``base_norms``: the base's row
    norms, for DoRA projections the adapter leaves out (``peft_dora``)."""
    scale = check_peft_config(peft_config, where, arch)
    r = peft_config["r"]
    dora = bool(peft_config.get("use_dora"))
    tensors, magnitudes = peft_dora.read(tensors, peft_config, arch, where)
    factors = _peft_factors(tensors, peft_config, r, arch, where)
    if dora:
        peft_dora.check_pairs(factors, magnitudes, where)
    present = {part for _, part in factors}
    modules = adapter_modules(arch)
    targets = [t for t in TARGET_ORDER if any(m.target == t and present & set(m.parts) for m in modules)]
    if per_projection and peft_experts.ROUTER in targets:
        raise ConversionError(f"{where} adapts the router, whose Megatron LoRA has no per-projection form; "
                              "import it without --per-projection (distinct A's are then stacked).")
    join = _per_projection if per_projection else _stacked_layer
    shapes = part_shapes(arch)
    module_factors: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in range(arch.num_layers):
        for module in modules:
            if module.target in targets:
                parts = [factors.get((layer, p)) for p in module.parts]
                module_factors[(layer, module.name)] = join(module, parts, arch, shapes, r)
    rank = max(b.shape[1] for _, b in module_factors.values())  # per-projection: r (A stacks r rows per projection)
    for module in modules:  # a Megatron LoRA layer takes a rank up to its smaller side
        side = min(sum(shapes[p][0] for p in module.parts), shapes[module.parts[0]][1])
        if module.target in targets and rank > side:
            fix = " or without the router" if module.target == peft_experts.ROUTER else \
                "" if per_projection else ", or import it with --per-projection"
            how = f" (r={r}, distinct A's stacked)" if rank > r else ""
            raise ConversionError(f"{where} imports at rank {rank}{how}, more than {module.name} "
                                  f"can hold (its smaller side is {side}); retrain the PEFT adapter with a rank "
                                  f"that fits{fix}.")
    out = {}
    for (layer, module), (a, b) in module_factors.items():
        pad = rank - b.shape[1]
        out[full_key(layer, module, "lora_A")] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        out[full_key(layer, module, "lora_B")] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1).contiguous()
    if dora:
        parts = {m.name: m for m in modules}
        needed = [(layer, p) for layer, module in module_factors for p in parts[module].parts]
        magnitudes = peft_dora.with_base_norms(needed, magnitudes, base_norms, where)
        for layer, module in module_factors:
            blocks = [magnitudes[(layer, p)] for p in parts[module].parts]
            out[full_key(layer, module, LORA_MAGNITUDE)] = _fuse(arch, parts[module], blocks).contiguous()
    if rank == r:
        alpha, rslora = peft_config["lora_alpha"], bool(peft_config.get("use_rslora"))
    else:
        alpha, rslora = scale * rank, False
    cfg = LoRAConfig(rank=rank, alpha=alpha, use_rslora=rslora, target_modules=tuple(targets),
                     dropout=float(peft_config.get("lora_dropout") or 0.0), per_projection=per_projection,
                     use_dora=dora)
    return out, cfg


def _per_projection(module: AdapterModule, parts: List[Optional[Tuple[torch.Tensor, torch.Tensor]]], arch: Arch,
                    shapes: Dict[str, Tuple[int, int]], r: int):
    """(A, B) of one per-projection layer: the parts' A's stacked, their B's fused (compact, rank r);
    an absent part is zero. Every part has rank r (``_peft_factors`` checked the shapes)."""
    dtype = next((p[1].dtype for p in parts if p is not None), torch.float32)
    named = list(zip(module.parts, parts))
    a_blocks = [p[0] if p is not None else torch.zeros(r, shapes[n][1], dtype=dtype) for n, p in named]
    b_parts = [p[1] if p is not None else torch.zeros(shapes[n][0], r, dtype=dtype) for n, p in named]
    return torch.cat(a_blocks), _fuse(arch, module, b_parts)


def _stack(parts: Sequence[Optional[Tuple[torch.Tensor, torch.Tensor]]], out_rows: Sequence[int]):
    """(A, [B of each part]): the distinct A's stacked, bitwise-equal ones once (our exports and
    PEFT's fused gate_up give projections one A), and each part's B in its A's columns, zeros
    elsewhere; an absent part (None) gets zero rows. At least one part is present."""
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
    dtype = next(p[1].dtype for p in parts if p is not None)
    b_parts = []
    for rows, part, index in zip(out_rows, parts, where_a):
        b = torch.zeros(rows, width, dtype=dtype)
        if part is not None:
            b[:, offsets[index]:offsets[index] + part[1].shape[1]] = part[1]
        b_parts.append(b)
    return torch.cat(blocks), b_parts


def _stacked_layer(module: AdapterModule, parts: List[Optional[Tuple[torch.Tensor, torch.Tensor]]], arch: Arch,
                   shapes: Dict[str, Tuple[int, int]], r: int):
    """(A, B) of one fused layer: distinct A's stacked, B block-structured, absent parts zero."""
    out_rows = [shapes[p][0] for p in module.parts]
    if all(p is None for p in parts):  # a layer the adapter skips: an exact zero update
        return torch.zeros(1, shapes[module.parts[0]][1]), torch.zeros(sum(out_rows), 1)
    a, b_parts = _stack(parts, out_rows)
    return a, _fuse(arch, module, b_parts)


def exported_modules(cfg: LoRAConfig, arch: Arch, where: str = "the adapter") -> List[AdapterModule]:
    """The LoRA layers of one decoder layer an adapter of ``cfg`` holds, refusing what PEFT cannot
    hold (checked from the config alone, so the in-memory export refuses on every rank)."""
    modules = adapter_modules(arch)
    names = {m.name: target_names(f"decoder.layers.0.{m.name}") for m in modules}
    unknown = [t for t in cfg.target_modules if not any(t in n for n in names.values())]
    if unknown:
        exportable = sorted({n for found in names.values() for n in found})
        raise ConversionError(f"{where}: LoRA targets {unknown} have no {arch.model_type} projection; "
                              f"exportable targets: {exportable}.")
    rows = [m for m in modules if any(t in names[m.name] for t in cfg.target_modules)]
    experts = [m.name for m in rows if any(p not in PARENT_OF_PART for p in m.parts)]
    if cfg.use_dora and experts:
        raise ConversionError(f"{where}: DoRA on {experts[0]}: {peft_dora.NO_EXPERTS}.")
    return rows


def peft_from_megatron(tensors: Dict[str, torch.Tensor], cfg: LoRAConfig, arch: Arch, compact: bool = True,
                       base_model_name_or_path: Optional[str] = None, where: str = "the adapter",
                       expert_layout: str = "fused"):
    """(PEFT tensors, adapter_config dict) with the same update as the full adapter (module docstring).
    ``expert_layout`` (MoE models): "fused", transformers 5 / peft's ``target_parameters``, or
    "per_expert", one LoRA per expert projection (``peft_experts``); dense models ignore it."""
    if expert_layout not in peft_experts.LAYOUTS:
        raise ValueError(f"expert_layout must be one of {peft_experts.LAYOUTS}, got {expert_layout!r}.")
    rows = exported_modules(cfg, arch, where)
    shapes = part_shapes(arch)
    expected = {}
    for layer in range(arch.num_layers):
        for m in rows:
            in_features = shapes[m.parts[0]][1]
            out_features = sum(shapes[p][0] for p in m.parts)
            expected[full_key(layer, m.name, "lora_A")] = (_projections(cfg, m) * cfg.rank, in_features)
            expected[full_key(layer, m.name, "lora_B")] = (out_features, cfg.rank)
            if cfg.use_dora:
                expected[full_key(layer, m.name, LORA_MAGNITUDE)] = (out_features,)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {v})" for k, v in expected.items()
             if k in tensors and tuple(tensors[k].shape) != v]
    if missing or extra or wrong:
        raise ConversionError(f"{where} does not fit the base model (check --base): "
                              f"missing {missing[:3]}, unexpected {extra[:3]}, wrong shapes {wrong[:3]}.")
    per_part = {}  # (layer, part) -> (A [R, in], B [out, R])
    out = {}
    for layer in range(arch.num_layers):
        for m in rows:
            a, b = tensors[full_key(layer, m.name, "lora_A")], tensors[full_key(layer, m.name, "lora_B")]
            a_parts = a.chunk(_projections(cfg, m)) if cfg.per_projection else None
            for i, (part, b_part) in enumerate(zip(m.parts, _split(arch, m, b))):
                per_part[(layer, part)] = (a_parts[i] if a_parts else a, b_part)
            if cfg.use_dora:  # compaction below changes no B·A, so no norm: the magnitudes copy as they are
                magnitude = tensors[full_key(layer, m.name, LORA_MAGNITUDE)]
                for part, m_part in zip(m.parts, _split(arch, m, magnitude)):
                    out[peft_dora.peft_key(layer, part)] = m_part.contiguous()
    fused = bool(arch.num_experts) and expert_layout == "fused"
    units = _units(per_part, arch, shapes, fused)
    keep = {k: (b.ne(0).any(0) & a.ne(0).any(1)).nonzero().flatten() for k, (a, b) in units.items()}
    width = max(a.shape[0] for a, _ in units.values())  # R, or 2R for a fused gate_up of distinct A's
    r_out = max(len(idx) for idx in keep.values()) if compact else width
    if r_out == 0:  # an untrained adapter (B = 0): keep its A's for further training
        r_out, compact = width, False
    fused_experts = {}
    for k, (a, b) in units.items():
        if compact:
            a, b = a[keep[k]], b[:, keep[k]]
        pad = r_out - a.shape[0]
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        if len(k) == 3:  # (layer, fused parameter, expert)
            fused_experts.setdefault(k[:2], {})[k[2]] = (a, b)
            continue
        layer, part = k
        for factor, t in (("lora_A", a), ("lora_B", b)):
            name = peft_key(layer, part, factor) if part in PARENT_OF_PART else \
                peft_experts.key(arch, layer, part, factor, expert_layout)
            out[name] = t.contiguous()
    targeted = {name for _, name in fused_experts}
    for (layer, name), experts in fused_experts.items():
        out.update(peft_experts.fused_tensors(layer, name, [experts[e] for e in range(arch.num_experts)], targeted))
    if r_out == cfg.rank:
        alpha, rslora = cfg.alpha, cfg.use_rslora
    else:
        alpha, rslora = cfg.scaling * r_out, False
    dense_parts = [p for m in rows for p in m.parts if p in PARENT_OF_PART]
    expert_projections = [q for q in peft_experts.PROJECTIONS if (0, peft_experts.part(0, q)) in per_part]
    router = (0, peft_experts.ROUTER) in per_part
    modules_more, parameters = peft_experts.config_targets(arch, expert_projections, router, expert_layout) \
        if arch.num_experts else ([], [])
    # peft's parameter LoRA (experts, router; per-expert adapters become it on load) refuses dropout
    dropout = 0.0 if expert_projections or router else cfg.dropout
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r_out,
                  lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
                  lora_dropout=dropout, use_rslora=rslora, target_modules=dense_parts + modules_more, bias="none",
                  fan_in_fan_out=False, use_dora=cfg.use_dora, modules_to_save=None, init_lora_weights=True,
                  rank_pattern={}, alpha_pattern={}, layers_to_transform=None, layers_pattern=None,
                  inference_mode=True, base_model_name_or_path=base_model_name_or_path)
    if parameters:
        config["target_parameters"] = parameters
    return out, config


def _units(per_part, arch: Arch, shapes, fused: bool) -> Dict[tuple, Tuple[torch.Tensor, torch.Tensor]]:
    """The (A, B) pairs PEFT stores, each compacted on its own: one per projection, except that
    with ``fused`` each expert's gate and up share one pair (``_stack``), keyed (layer, parameter, expert)."""
    units = {k: v for k, v in per_part.items() if not (fused and k[1].startswith("experts."))}
    if not fused:
        return units
    for layer in range(arch.num_layers):
        for e in range(arch.num_experts):
            for name, projections in peft_experts.FUSED.items():
                parts = [per_part.get((layer, peft_experts.part(e, q))) for q in projections]
                if any(p is not None for p in parts):
                    a, b_parts = _stack(parts, [shapes[peft_experts.part(e, q)][0] for q in projections])
                    units[(layer, name, e)] = (a, torch.cat(b_parts))
    return units


def _projections(cfg: LoRAConfig, module: AdapterModule) -> int:
    """How many A's the layer stacks: its projections under per-projection LoRA, else one."""
    return len(module.parts) if cfg.per_projection else 1
