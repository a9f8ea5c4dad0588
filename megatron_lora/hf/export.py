"""In-memory export for RL loops: the adapter as PEFT tensors, or the merged model as Hugging
Face tensors streamed one at a time, straight from a training model at any TP / PP layout.

An RL loop (verl, NeMo-RL, ...) hands the policy to a vLLM / SGLang engine after every update.
Writing a checkpoint and converting it costs minutes of disk I/O; these functions give the
engine the same tensors the file conversions would write, without files and without touching
the training model (every result is a fresh tensor, no parameter is written).

* :func:`export_peft`: the adapter exactly as ``megatron-to-peft`` writes it. It gathers with
  ``gather_full_adapter`` (what ``save_full_adapter`` writes) and maps with
  ``peft_from_megatron`` (what the converter runs), so tensors and ``adapter_config.json`` are
  the converter's, bit for bit.
* :func:`export_merged`: ``W + s·B·A`` per base tensor, as ``merge --to hf`` writes it. For each
  logical Megatron tensor in pipeline order, the TP group of the stage that holds it gathers it
  (and the layer's factors), merges out of place in fp32 with ``fp32_lora_delta`` (the formula
  ``merge_lora`` applies on the fp32 model the ``merge`` conversion builds), casts once, splits
  fused rows into Hugging Face projections (``hf_from_megatron_tensor``, the converter's mapping)
  and sends the pieces to the destination over the pipeline group. Peak extra memory is about
  two copies of the largest single tensor (``linear_fc1`` or the embedding), never the model.

The architecture is read from the model (``arch_from_model``: its TransformerConfig, vocabulary
and embedding tying); an ``hf_config`` (the engine's config.json as a dict) is checked against
it, so a model the engine would load differently fails before anything is gathered.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_lora.core import collectives as C
from megatron_lora.core.checkpoint import common
from megatron_lora.core.checkpoint.adapter import (
    _check_loaded_factors, _model_config, check_finite_float, gather_factor, gather_full_adapter,
)
from megatron_lora.core.inject import global_module_names, lora_modules, model_chunks
from megatron_lora.core.layers import LoRALayerMixin, fp32_lora_delta, is_gated_fc1, is_lora_key
from megatron_lora.core.layout import unshard_tensors
from megatron_lora.hf.mapping import (
    Arch, ConversionError, arch_from_model_args, check_hf_config_matches, hf_from_megatron_tensor, hf_names_of,
    hf_shapes, megatron_names,
)
from megatron_lora.hf.peft_adapters import peft_from_megatron

WHERE = "the model's adapter"


# ------------------------------------------------------------------------------- architecture

def _unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk


def arch_from_model(model, hf_config: Optional[dict] = None) -> Arch:
    """The Hugging Face sizes of a Llama-family ``GPTModel`` (or its VPP chunks), checked like a
    ``model_args.json``; with ``hf_config`` (a config.json dict) also checked against it."""
    from megatron.core.models.gpt import GPTModel

    chunk = _unwrap(model_chunks(model)[0])
    if not isinstance(chunk, GPTModel):
        raise ConversionError(f"the model is a {type(chunk).__name__}; the Hugging Face export reads a "
                              "Megatron-Core GPTModel (Llama / Qwen2 layout). Export a GPTModel.")
    c = chunk.config
    unsupported = [what for what, found in (
        ("qk_layernorm", getattr(c, "qk_layernorm", False)),
        ("MoE (num_moe_experts)", getattr(c, "num_moe_experts", None)),
        ("multi_latent_attention", getattr(c, "multi_latent_attention", False)),
        ("rotary_interleaved", getattr(c, "rotary_interleaved", False))) if found]
    if unsupported:
        raise ConversionError(f"the model uses {', '.join(unsupported)}, which Llama / Qwen2 do not have; "
                              "only those architectures export to Hugging Face names.")
    model_args = dict(
        swiglu=bool(c.gated_linear_unit) and c.activation_func is torch.nn.functional.silu,
        normalization=c.normalization, position_embedding_type=chunk.position_embedding_type,
        add_bias_linear=c.add_bias_linear, add_qkv_bias=c.add_qkv_bias, num_layers=c.num_layers,
        hidden_size=c.hidden_size, ffn_hidden_size=c.ffn_hidden_size, num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_query_groups, kv_channels=c.kv_channels, padded_vocab_size=chunk.vocab_size,
        untie_embeddings_and_output_weights=not chunk.share_embeddings_and_output_weights)
    arch = arch_from_model_args(model_args, "the model (its TransformerConfig)")
    if hf_config is not None:
        check_hf_config_matches(hf_config, arch, "hf_config", other="training model")
    return arch


def _check_dst(dst: Optional[int]) -> None:
    world = dist.get_world_size() if dist.is_initialized() else 1
    if dst is not None and not (isinstance(dst, int) and 0 <= dst < world):
        raise ValueError(f"dst must be a global rank in [0, {world}) or None (every rank), got {dst!r}.")


def _receives(dst: Optional[int]) -> bool:
    return dst is None or dst == common.rank()


# -------------------------------------------------------------------------------------- PEFT

def export_peft(model, hf_config: Optional[dict] = None, dst: Optional[int] = 0, compact: bool = True,
                base_model_name_or_path: Optional[str] = None) -> Optional[Tuple[Dict[str, torch.Tensor], dict]]:
    """The adapter as PEFT tensors (``base_model.model.model.layers.N...lora_A.weight``, on the
    CPU) and its ``adapter_config.json`` dict, on rank ``dst`` (every rank with None); None on
    the others. Collective: every rank calls it. The same bits as ``megatron-to-peft``
    (``compact`` = not ``--keep-rank``); a non-finite factor raises on every rank.

    Only ``dst`` receives the adapter (once); the other ranks send at most their stage's factors
    and one data-parallel replica takes part (``gather_full_adapter``, docs/design.md §16)."""
    _check_dst(dst)
    arch = arch_from_model(model, hf_config)
    cfg = _model_config(model)
    _check_loaded_factors(model, WHERE)  # each rank its shards, so that every rank raises
    tensors = gather_full_adapter(model, dst=dst)
    if not _receives(dst):
        return None
    peft_tensors, config = peft_from_megatron(tensors, cfg, arch, compact, base_model_name_or_path, WHERE)
    live = {p.untyped_storage().data_ptr() for m in lora_modules(model) for p in (m.lora_A, m.lora_B)}
    # With TP=1 on the CPU a gathered factor IS the parameter: never hand it out.
    return {k: t.clone() if t.untyped_storage().data_ptr() in live else t for k, t in peft_tensors.items()}, config


# ------------------------------------------------------------------------------------ merged

def export_merged(model, hf_config: Optional[dict] = None, dtype: Optional[torch.dtype] = None,
                  dst: Optional[int] = 0) -> Iterator[Tuple[str, torch.Tensor]]:
    """(Hugging Face name, merged tensor) pairs, one at a time, in pipeline order (embedding,
    layers, final norm, lm_head unless tied), on the model's device, in ``dtype`` (default: the
    parameters' dtype), on rank ``dst`` (every rank with None). The iterator is collective:
    EVERY rank must run it to the end (``for _ in it: pass`` on ranks that only send); on
    other ranks it yields nothing. A layer's adapter is merged when it is enabled, as the forward
    runs it. The model is checked now, before the first tensor is asked for."""
    _check_dst(dst)
    arch = arch_from_model(model, hf_config)
    merged = [m.lora_init_name for m in lora_modules(model) if m.lora_merged]
    if merged:
        raise ConversionError(f"{merged[0]} is merged (merge_lora): its weight already holds the adapter. "
                              "Call unmerge_lora(model) before exporting.")
    _check_loaded_factors(model, WHERE)
    held = _held_tensors(model)
    routes = _Routes(held, megatron_names(arch))
    if dtype is None:
        dtype = next(p for chunk in model_chunks(model) for p in chunk.parameters()).dtype
    device = next(p for chunk in model_chunks(model) for p in chunk.parameters()).device
    return _stream(held, routes, arch, dtype, device, dst)


def _held_tensors(model) -> Dict[str, Tuple[torch.nn.Module, str]]:
    """{global Megatron name: (module, parameter name)} of this rank's base parameters."""
    out = {}
    for chunk in model_chunks(model):
        for module, name in global_module_names(_unwrap(chunk)).items():
            for pname, _ in module.named_parameters(recurse=False):
                if not is_lora_key(pname):
                    out[f"{name}.{pname}"] = (module, pname)
    return out


class _Routes:
    """Which pipeline stage holds each tensor, and who sends it where (one small all-gather)."""

    def __init__(self, held: dict, names: List[str]):
        from megatron.core import parallel_state as ps

        self.pp_group = ps.get_pipeline_model_parallel_group()
        me = dict(stage=ps.get_pipeline_model_parallel_rank(),
                  pp_ranks=dist.get_process_group_ranks(self.pp_group),
                  tp_ranks=dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
                  names=sorted(set(names) & set(held)))
        self.table = common.all_ranks(me)
        self.me = self.table[common.rank()]
        self.stage = {}
        for entry in self.table:
            self.stage.update({name: entry["stage"] for name in entry["names"]})
        missing = [n for n in names if n not in self.stage]
        if missing:
            raise ConversionError(
                f"no rank holds {missing[:3]}{' ...' if len(missing) > 3 else ''}: the export reads Megatron's "
                "local GPT spec (separate input_layernorm / pre_mlp_layernorm modules); Transformer Engine "
                "specs with norms fused into linear_qkv / linear_fc1 are not supported.")

    def source(self, name: str, dst: Optional[int]) -> Optional[int]:
        """The global rank that sends ``name`` to ``dst`` (to this rank's pipeline group if None)."""
        pp_ranks = self.me["pp_ranks"] if dst is None else self.table[dst]["pp_ranks"]
        return pp_ranks[self.stage[name]]

    def computes(self, name: str, dst: Optional[int]) -> bool:
        """Whether this rank gathers and merges ``name`` (the source's TP group does)."""
        return self.me["stage"] == self.stage[name] and self.source(name, dst) in self.me["tp_ranks"]


def _stream(held, routes: _Routes, arch: Arch, dtype, device, dst) -> Iterator[Tuple[str, torch.Tensor]]:
    shapes, rank = hf_shapes(arch), common.rank()
    multi_stage = len(routes.me["pp_ranks"]) > 1
    for name in megatron_names(arch):
        src = routes.source(name, dst)
        pieces = []
        if routes.computes(name, dst):
            module, pname = held[name]
            merged = _merged_logical(name, module, pname).to(dtype)  # cast once; the split is exact
            pieces = [piece for _, piece in hf_from_megatron_tensor(name, merged, arch)]
            del merged
        for hf_name in hf_names_of(name):
            piece = pieces.pop(0).contiguous() if pieces else None  # keep no reference to what is handed out
            if dst is None and multi_stage:
                if piece is None:
                    piece = torch.empty(shapes[hf_name], dtype=dtype, device=device)
                dist.broadcast(piece, src=src, group=routes.pp_group)
            elif dst is not None and src != dst and rank == dst:
                piece = torch.empty(shapes[hf_name], dtype=dtype, device=device)
                dist.recv(piece, src=src)
            elif dst is not None and src != dst and rank == src:
                dist.send(piece, dst=dst)
            if _receives(dst):
                yield hf_name, piece
            del piece


def _merged_logical(name: str, module, pname: str) -> torch.Tensor:
    """The logical (TP=1) tensor ``name``, a fresh copy, with the layer's enabled adapter merged
    in fp32."""
    with torch.no_grad():
        full = _gather_fresh(name, module, getattr(module, pname))
        if not (isinstance(module, LoRALayerMixin) and pname == "weight" and module.lora_enabled):
            return full
        full = full.float()
        # W + s·B·A with the factors in their logical form: merge_lora's sum on the fp32 TP=1
        # model of the ``merge`` conversion, so the bits match it (IEEE addition commutes).
        a, b = gather_factor(module, "lora_A"), module.lora_dense_b(gather_factor(module, "lora_B"))
        return full.add_(fp32_lora_delta(a, b, module.lora_scaling))


def _gather_fresh(name: str, module, param: torch.nn.Parameter) -> torch.Tensor:
    """``param`` gathered over the layer's TP group along Megatron's declared partition dim
    (``[gate_i; up_i]`` halves for a gated ``linear_fc1``), as a new tensor."""
    from megatron.core import parallel_state as ps

    dim = getattr(param, "partition_dim", None) if getattr(param, "tensor_model_parallel", False) else None
    param = param.detach()  # the TP attributes live on the Parameter object, read above
    group = getattr(module, "tp_group", None) or ps.get_tensor_model_parallel_group()
    if dim is None or dist.get_world_size(group) == 1:
        return param.clone()
    gated = dim == 0 and is_gated_fc1(getattr(module, "config", None), name.rsplit(".", 2)[-2])
    return unshard_tensors(C.all_gather_list(param, group), dim, gated=gated)
