"""PEFT's two formats for the experts and router of a mixture-of-experts layer (Qwen3-MoE, Mixtral),
read into and written from one ``(A, B)`` per expert projection (pure tensor code, no peft import).

transformers 5 holds a layer's experts fused, ``mlp.experts.gate_up_proj [E, 2I, H]`` (expert e's
gate rows, then its up rows) and ``mlp.experts.down_proj [E, H, I]``, and the router as
``mlp.gate.weight [E, H]``. PEFT (0.18+) adapts them as parameters (``target_parameters``), one
rank-r block per expert in one pair of factors per fused parameter::

    lora_A  [r·E, in]    expert-major rows: expert e's A is rows e·r ... e·r + r - 1
    lora_B  [out, r·E]   rank-major columns: expert e's B is columns e, E + e, 2E + e, ...
    ΔW[e] = s · B[:, e::E] · A[e·r : e·r + r]

**Fused keys** (under ``base_model.model.model.layers.N.mlp.``). Two targeted parameters of one
module nest two wrappers; the parameter registered first (``gate_up_proj``) is the inner one, so
a key names a parameter only together with ``target_parameters``::

    targeted                 gate_up_proj                    down_proj
    both                     experts.base_layer.lora_A|B     experts.lora_A|B
    gate_up_proj only        experts.lora_A|B                -
    down_proj only           -                               experts.lora_A|B

With 2I = H both lora_B have one shape: tell them apart by key, never by shape. The router:
``gate.lora_A [r, H]``, ``gate.lora_B [E, r]`` (``target_parameters=["mlp.gate.weight"]``; peft
turns ``target_modules=["gate"]`` into that), logits ``X (W + s·B·A)^T``, Megatron's router LoRA.

**Per-expert keys**: one LoRA per expert projection under the names of the model's own checkpoint
(transformers 4 models held the experts as linears; inference engines load this layout)::

    Qwen3-MoE   mlp.experts.{e}.gate_proj | up_proj | down_proj                   router mlp.gate
    Mixtral     block_sparse_moe.experts.{e}.w1 | w3 | w2   (gate | up | down)    router block_sparse_moe.gate

Both formats read into ``{(layer, part): (A [r, in], B [out, r])}`` with the parts
``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj`` and ``router``. A fused gate_up block gives
gate and up the very same A (``peft_adapters`` stores it once: rank r, Megatron's fc1 rows are
``[gate; up]`` too). Fusing the parts into Megatron's layers is ``peft_adapters``'.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_lora.hf.mapping import Arch, ConversionError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ROUTER = "router"
# Fused parameters in registration order (the inner wrapper first), with the projections they hold.
FUSED = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
ROUTER_PARAMETER = "mlp.gate.weight"
TARGET_PARAMETERS = {f"mlp.experts.{p}": p for p in FUSED}
# Spellings of the same targets peft matches (a target parameter matches any key ending in it).
_SPELLINGS = {**{s: p for p in FUSED for s in (f"mlp.experts.{p}", f"experts.{p}", p)},
              **{s: ROUTER for s in (ROUTER_PARAMETER, "gate.weight")}}
# Per-expert layout: (expert parent under model.layers.N., leaf name of gate, up, down).
PER_EXPERT_NAMES = {"qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
                    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}
LAYOUTS = ("fused", "per_expert")

_PREFIX = r"^base_model\.model\.model\.layers\.(\d+)\."
FUSED_KEY = re.compile(_PREFIX + r"mlp\.experts\.((?:base_layer\.)*)lora_(A|B)\.weight$")
EXPERT_KEY = re.compile(_PREFIX + r"(\w+)\.experts\.(\d+)\.(\w+)\.lora_(A|B)\.weight$")
ROUTER_KEY = re.compile(_PREFIX + r"(\w+)\.gate\.lora_(A|B)\.weight$")


def part(expert: int, projection: str) -> str:
    return f"experts.{expert}.{projection}"


def part_shapes(arch: Arch) -> Dict[str, Tuple[int, int]]:
    """[out, in] of every expert projection and the router of one layer."""
    h, i = arch.hidden_size, arch.moe_ffn_hidden_size
    shapes = {ROUTER: (arch.num_experts, h)}
    for e in range(arch.num_experts):
        shapes.update({part(e, "gate_proj"): (i, h), part(e, "up_proj"): (i, h), part(e, "down_proj"): (h, i)})
    return shapes


def expert_modules(arch: Arch) -> List[Tuple[str, str, Tuple[str, ...]]]:
    """(Megatron module under ``decoder.layers.N.``, its LoRA target, its parts in row order) for
    every expert linear (global expert index) and the router of one MoE layer."""
    out = []
    for e in range(arch.num_experts):
        out.append((f"mlp.experts.local_experts.{e}.linear_fc1", "linear_fc1",
                    (part(e, "gate_proj"), part(e, "up_proj"))))
        out.append((f"mlp.experts.local_experts.{e}.linear_fc2", "linear_fc2", (part(e, "down_proj"),)))
    out.append(("mlp.router", ROUTER, (ROUTER,)))
    return out


def _family(arch: Arch, where: str) -> Tuple[str, Tuple[str, ...]]:
    if arch.model_type not in PER_EXPERT_NAMES:
        raise ConversionError(f"{where}: expert adapters of model type {arch.model_type!r} are not supported; "
                              f"supported: {sorted(PER_EXPERT_NAMES)}.")
    return PER_EXPERT_NAMES[arch.model_type]


def target_module_names(arch: Optional[Arch]) -> set:
    """The expert and router ``target_modules`` a per-expert (transformers 4) adapter may name."""
    families = [PER_EXPERT_NAMES[arch.model_type]] if arch is not None else PER_EXPERT_NAMES.values()
    return {leaf for _, leaves in families for leaf in leaves} | {"gate"}


def targeted_parameters(config: dict, where: str) -> Tuple[str, ...]:
    """The fused parameters and router ``target_parameters`` names (``gate_up_proj``, ``down_proj``,
    ``router``) in registration order; anything else is refused, naming it."""
    names = config.get("target_parameters") or []
    unknown = [t for t in names if t not in _SPELLINGS]
    if unknown:
        raise ConversionError(f"{where}: target_parameters {unknown} are not expert or router parameters of "
                              f"Qwen3-MoE / Mixtral; supported: {sorted(set(TARGET_PARAMETERS) | {ROUTER_PARAMETER})}.")
    found = {_SPELLINGS[t] for t in names}
    return tuple(p for p in (*FUSED, ROUTER) if p in found)


def read(tensors: Dict[str, torch.Tensor], config: dict, arch: Arch, r: int, where: str):
    """(``{(layer, part): (A, B)}`` of the experts and routers, the tensors left for the dense
    reader). Every key, pairing and shape is checked; one layer's factors in one layout only."""
    targeted = targeted_parameters(config, where)
    parent, leaves = _family(arch, where)
    projection_of_leaf = dict(zip(leaves, PROJECTIONS))
    shapes = part_shapes(arch)
    fused_order = [p for p in targeted if p in FUSED]
    found: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}  # fused: (layer, parameter)
    rest, per_expert, fused = {}, {}, {}
    for key, tensor in tensors.items():
        m_fused, m_expert, m_router = FUSED_KEY.match(key), EXPERT_KEY.match(key), ROUTER_KEY.match(key)
        if m_fused:
            depth = len(m_fused.group(2)) // len("base_layer.")
            if depth >= len(fused_order):
                raise ConversionError(
                    f"{where}: {key} is a fused expert factor, but adapter_config.json's target_parameters "
                    f"{config.get('target_parameters')!r} name {len(fused_order)} expert parameter(s) "
                    "(mlp.experts.gate_up_proj, mlp.experts.down_proj); the config does not belong to these tensors.")
            layer, name = int(m_fused.group(1)), fused_order[len(fused_order) - 1 - depth]
            _check_layer(layer, arch, key, where)
            fused.setdefault((layer, name), {})[m_fused.group(3)] = (key, tensor)
        elif m_expert and m_expert.group(2) == parent and m_expert.group(4) in projection_of_leaf:
            layer, e = int(m_expert.group(1)), int(m_expert.group(3))
            _check_layer(layer, arch, key, where)
            if e >= arch.num_experts:
                raise ConversionError(f"{where}: {key} is for expert {e}, the model has {arch.num_experts} experts; "
                                      "check --base.")
            p = part(e, projection_of_leaf[m_expert.group(4)])
            per_expert.setdefault(layer, set()).add(e)
            found.setdefault((layer, p), {})[m_expert.group(5)] = _checked(key, tensor, r, shapes[p], where)
        elif m_router and m_router.group(2) in ("mlp", parent):
            layer = int(m_router.group(1))
            _check_layer(layer, arch, key, where)
            found.setdefault((layer, ROUTER), {})[m_router.group(3)] = _checked(key, tensor, r, shapes[ROUTER], where)
        else:
            rest[key] = tensor
    for (layer, name), pair in fused.items():
        if len(pair) != 2:
            raise ConversionError(f"{where}: layer {layer} mlp.experts.{name} has lora_{''.join(pair)} "
                                  "but not both factors.")
        if layer in per_expert:
            raise ConversionError(f"{where}: layer {layer} has both fused (mlp.experts.lora_A) and per-expert "
                                  f"(mlp.experts.{min(per_expert[layer])}...) expert factors; one layout per adapter.")
        for e, parts in enumerate(_split_fused(name, pair["A"], pair["B"], arch, r, where)):
            for p, factors in zip(FUSED[name], parts):
                found[(layer, part(e, p))] = dict(zip("AB", factors))
    for (layer, p), pair in found.items():
        if len(pair) != 2:
            raise ConversionError(f"{where}: layer {layer} {p} has lora_{''.join(pair)} but not both factors.")
    return {k: (v["A"], v["B"]) for k, v in found.items()}, rest


def _check_layer(layer: int, arch: Arch, key: str, where: str) -> None:
    if layer >= arch.num_layers:
        raise ConversionError(f"{where}: {key} is for layer {layer}, the model has {arch.num_layers} layers; "
                              "check --base.")


def _checked(key: str, tensor: torch.Tensor, r: int, shape: Tuple[int, int], where: str) -> torch.Tensor:
    out_features, in_features = shape
    expected = (r, in_features) if key.endswith("lora_A.weight") else (out_features, r)
    if tuple(tensor.shape) != expected:
        raise ConversionError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {expected} (r={r}, "
                              f"the base projection is [{out_features}, {in_features}]); the adapter belongs to "
                              "another model (check --base) or uses per-module ranks.")
    return tensor


def _split_fused(name: str, a_key, b_key, arch: Arch, r: int, where: str):
    """Per expert, per projection of the fused parameter ``name``: (A [r, in], B [out, r])."""
    (ka, a), (kb, b) = a_key, b_key
    n, h, i = arch.num_experts, arch.hidden_size, arch.moe_ffn_hidden_size
    out_features, in_features = (2 * i, h) if name == "gate_up_proj" else (h, i)
    for key, t, expected in ((ka, a, (r * n, in_features)), (kb, b, (out_features, r * n))):
        if tuple(t.shape) != expected:
            raise ConversionError(
                f"{where}: {key} ({name}) has shape {tuple(t.shape)}, expected {expected} (r={r} x {n} experts, "
                f"mlp.experts.{name} is [{n}, {out_features}, {in_features}]); the adapter belongs to another "
                "model (check --base) or uses per-module ranks.")
    b_experts = b.reshape(out_features, r, n)  # rank-major columns
    out = []
    for e in range(n):
        a_e, b_e = a[e * r:(e + 1) * r], b_experts[:, :, e]
        out.append([(a_e, b_e)] if name == "down_proj" else [(a_e, b_e[:i]), (a_e, b_e[i:])])
    return out


# -------------------------------------------------------------------------------------- write

def key(arch: Arch, layer: int, p: str, factor: str, layout: str) -> str:
    """The per-expert (or router) key of one part; the router's parent is the layout's."""
    parent, leaves = _family(arch, "the export")
    prefix = f"base_model.model.model.layers.{layer}."
    if p == ROUTER:
        return f"{prefix}{parent if layout == 'per_expert' else 'mlp'}.gate.{factor}.weight"
    _, e, projection = p.split(".")
    return f"{prefix}{parent}.experts.{e}.{dict(zip(PROJECTIONS, leaves))[projection]}.{factor}.weight"


def fused_tensors(layer: int, name: str, experts: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                  targeted: Sequence[str]) -> Dict[str, torch.Tensor]:
    """PEFT's two tensors of fused parameter ``name`` from every expert's (A [r, in], B [out, r]),
    all of one r; ``targeted``: the fused parameters the adapter has (they fix the nesting)."""
    order = [p for p in FUSED if p in targeted]
    inner = "base_layer." * (len(order) - 1 - order.index(name))
    prefix = f"base_model.model.model.layers.{layer}.mlp.experts.{inner}"
    a = torch.cat([a for a, _ in experts])  # expert-major rows
    b = torch.stack([b for _, b in experts], dim=2).flatten(1)  # [out, r, E] -> rank-major columns
    return {prefix + "lora_A.weight": a.contiguous(), prefix + "lora_B.weight": b.contiguous()}


def config_targets(arch: Arch, projections: Sequence[str], router: bool, layout: str):
    """(extra target_modules, target_parameters) of an export whose experts have ``projections``
    (``gate_proj``... in order) adapted, and the router if ``router``."""
    if layout == "per_expert":
        leaves = dict(zip(PROJECTIONS, _family(arch, "the export")[1]))
        return [leaves[p] for p in projections] + (["gate"] if router else []), []
    parameters = [f"mlp.experts.{name}" for name, held in FUSED.items() if any(p in held for p in projections)]
    return [], parameters + ([ROUTER_PARAMETER] if router else [])
