"""Hugging Face Llama-family <-> Megatron-Core GPT: configs, tensor names and fused row layouts.

Pure functions on dicts and tensors (torch only: no Megatron, transformers or peft import), so
each is unit-tested alone; ``families`` reads each family's config.json, ``peft_adapters`` maps
PEFT adapters and ``to_megatron`` / ``merge`` do the I/O.

Per layer, Megatron fuses what Hugging Face keeps apart (logical, TP=1 tensors; e = expert)::

    HF (model.layers.N.)                          Megatron-Core GPTModel (decoder.layers.N., local spec)
    self_attn.{q,k,v}_proj  ──fuse_qkv──►          self_attention.linear_qkv   [(H + 2G)·d, h]
    self_attn.o_proj                               self_attention.linear_proj  [h, H·d]
    self_attn.{q,k}_norm           (Qwen3)         self_attention.{q,k}_layernorm            [d]
    mlp.{gate,up}_proj      ──cat──►               mlp.linear_fc1              [2f, h] = [gate; up]
    mlp.down_proj                                  mlp.linear_fc2              [h, f]
    mlp.gate                       (MoE router)    mlp.router                                [E, h]
    mlp.experts.e.{gate,up}_proj  ──cat──►         mlp.experts.local_experts.e.linear_fc1    [2I, h]
    mlp.experts.e.down_proj                        mlp.experts.local_experts.e.linear_fc2    [h, I]
    input_layernorm / post_attention_layernorm     input_layernorm / pre_mlp_layernorm

Mixtral names its MoE block ``block_sparse_moe`` and its expert projections ``w1`` / ``w3`` /
``w2`` (gate / up / down). That per-expert layout is what ``save_pretrained`` writes and what is
written here; transformers 5 holds the experts fused in memory, ``mlp.experts.gate_up_proj``
``[E, 2I, h]`` (each expert's ``[gate; up]``, i.e. its ``linear_fc1``) and ``mlp.experts.down_proj``
``[E, h, I]`` with the router at ``mlp.gate``, for both families: that layout is read too.

``linear_qkv`` rows are grouped per query group (H heads, G groups, head dim d); group g holds
its H/G query heads, then its key head, then its value head. Worked example, H=4, G=2, d=16::

    rows  0-31 q heads 0,1 | 32-47 k0 | 48-63 v0 | 64-95 q heads 2,3 | 96-111 k1 | 112-127 v1

Reading them as ``[Q; K; V]`` blocks still trains, but is a different model (docs/design.md
§10, trap 6). TP then splits whole groups, and ``linear_fc1`` per shard as ``[gate_i; up_i]``
(``core/layout.py``).
HF Llama's ``rotate_half`` RoPE is Megatron's non-interleaved RoPE, so q/k rows copy unpermuted;
the q/k norms act on each head before RoPE in both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_lora.hf import families

SUPPORTED_MODEL_TYPES = families.FAMILIES

# Megatron module (under decoder.layers.N.) -> (HF parent under model.layers.N., HF parts in fused order)
MODULES: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "self_attention.linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "self_attention.linear_proj": ("self_attn", ("o_proj",)),
    "mlp.linear_fc1": ("mlp", ("gate_proj", "up_proj")),
    "mlp.linear_fc2": ("mlp", ("down_proj",)),
}
LORA_TARGET_OF_PART = {part: module.rsplit(".", 1)[1] for module, (_, parts) in MODULES.items() for part in parts}
MODULE_OF_TARGET = {module.rsplit(".", 1)[1]: module for module in MODULES}
NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "pre_mlp_layernorm"}
QK_NORMS = {"q_layernorm": "q_norm", "k_layernorm": "k_norm"}  # Megatron -> HF, under the attention
GLOBAL_NAMES = {"model.embed_tokens.weight": "embedding.word_embeddings.weight",
                "model.norm.weight": "decoder.final_layernorm.weight",
                "lm_head.weight": "output_layer.weight"}
# MoE families on disk: the MoE block's HF parent, and each expert linear's HF parts in fused order
EXPERTS: Dict[str, Tuple[str, Dict[str, Tuple[str, ...]]]] = {
    "qwen3_moe": ("mlp", {"linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",)}),
    "mixtral": ("block_sparse_moe", {"linear_fc1": ("w1", "w3"), "linear_fc2": ("w2",)}),
}
FUSED_EXPERTS = {"linear_fc1": "gate_up_proj", "linear_fc2": "down_proj"}  # in memory, under mlp.experts.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])$")


class ConversionError(ValueError):
    """Input a conversion cannot use; the message names the problem and the fix (one line)."""


# ----------------------------------------------------------------------------- architecture

@dataclass(frozen=True)
class Arch:
    """The sizes a conversion needs; from a Hugging Face config or a Megatron ``model_args.json``."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_groups: int
    head_dim: int
    vocab_size: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on queries and keys (Megatron --qk-layernorm)
    num_experts: int = 0  # 0: a dense MLP; else every layer's MLP is a mixture of experts
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0  # one expert's intermediate size
    moe_pre_softmax: bool = False  # softmax over all experts, then top-k, not renormalised

    @property
    def model_type(self) -> str:
        """The Hugging Face family this architecture is: the one ``megatron-to-hf`` writes."""
        if self.num_experts:
            return "qwen3_moe" if self.qk_norm else "mixtral"
        return "qwen3" if self.qk_norm else "qwen2" if self.qkv_bias else "llama"

    def part_shapes(self) -> Dict[str, Tuple[int, int]]:
        """[out, in] of every HF projection of one layer."""
        q, kv = self.num_heads * self.head_dim, self.num_groups * self.head_dim
        h, f = self.hidden_size, self.ffn_hidden_size
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}

    def module_shape(self, module: str) -> Tuple[int, int]:
        """[out, in] of a fused Megatron linear (``self_attention.linear_qkv`` ...,
        ``mlp.experts.local_experts.e.linear_fc1``: one expert's ``[gate; up]``)."""
        expert = _EXPERT.match(module)
        if expert:
            h, i = self.hidden_size, self.moe_ffn_hidden_size
            return (2 * i, h) if expert.group(2) == "linear_fc1" else (h, i)
        shapes = self.part_shapes()
        parts = MODULES[module][1]
        return sum(shapes[p][0] for p in parts), shapes[parts[0]][1]

    def fuse(self, module: str, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """HF parts (rows first) -> the Megatron fused tensor, for weights, biases and LoRA B
        (an expert's linears fuse as the dense MLP's)."""
        if module == "self_attention.linear_qkv":
            return fuse_qkv(*parts, num_heads=self.num_heads, num_groups=self.num_groups)
        return torch.cat(list(parts), dim=0) if len(parts) > 1 else parts[0]

    def split(self, module: str, fused: torch.Tensor) -> List[torch.Tensor]:
        """Inverse of :meth:`fuse`."""
        if module == "self_attention.linear_qkv":
            return split_qkv(fused, self.num_heads, self.num_groups)
        parts = MODULES[_dense_twin(module)][1]
        return [p.contiguous() for p in fused.chunk(len(parts), dim=0)] if len(parts) > 1 else [fused]


def _dense_twin(module: str) -> str:
    """``mlp.linear_fc1`` for an expert's ``mlp.experts.local_experts.e.linear_fc1`` (same row
    layout); any other module unchanged."""
    expert = _EXPERT.match(module)
    return f"mlp.{expert.group(2)}" if expert else module


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """``[q; k; v]`` rows -> Megatron's per-query-group rows (see the module docstring)."""
    if num_heads % num_groups:
        raise ConversionError(f"{num_heads} attention heads do not divide into {num_groups} query groups.")
    d = q.shape[0] // num_heads
    if q.shape[0] != num_heads * d or k.shape[0] != num_groups * d or v.shape[0] != k.shape[0]:
        raise ConversionError(
            f"q/k/v rows {q.shape[0]}/{k.shape[0]}/{v.shape[0]} do not fit {num_heads} heads and "
            f"{num_groups} key/value heads of one head size; check the model's head counts.")
    rest = tuple(q.shape[1:])
    per_group = (num_heads // num_groups) * d
    grouped = [q.reshape(num_groups, per_group, *rest), k.reshape(num_groups, d, *rest),
               v.reshape(num_groups, d, *rest)]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def split_qkv(fused: torch.Tensor, num_heads: int, num_groups: int) -> List[torch.Tensor]:
    """Megatron's per-query-group rows -> ``[q, k, v]`` (inverse of :func:`fuse_qkv`)."""
    n_rows = fused.shape[0]
    if num_heads % num_groups or n_rows % (num_heads + 2 * num_groups):
        raise ConversionError(f"linear_qkv has {n_rows} rows, which do not fit {num_heads} heads in "
                              f"{num_groups} query groups; check the model's head counts.")
    d = n_rows // (num_heads + 2 * num_groups)
    rest = tuple(fused.shape[1:])
    per_group = (num_heads // num_groups) * d
    grouped = fused.reshape(num_groups, per_group + 2 * d, *rest)
    q, k, v = grouped.split([per_group, d, d], dim=1)
    return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


# ---------------------------------------------------------------------- Hugging Face configs

def check_hf_config(cfg: dict, where: str = "config.json", names: Optional[Iterable[str]] = None) -> None:
    """Refuse what the Megatron GPT of ``pretrain_gpt_lora.py`` cannot reproduce exactly, naming
    the model type; with the checkpoint's tensor ``names`` also the first tensor it cannot map."""
    model_type = cfg.get("model_type")
    if model_type not in families.FAMILIES:
        raise ConversionError(f"{where}: {families.unsupported_family(cfg)}{_first_unsupported(names, None)}; "
                              f"supported: {families.supported()}.")
    missing = families.missing_sizes(cfg)
    if missing:
        raise ConversionError(f"{where}: {', '.join(missing)} missing or not integers; "
                              "pass the model's own config.json.")
    problems = families.config_problems(cfg)
    if problems:
        first = _first_unsupported(names, arch_from_hf_config(cfg))
        raise ConversionError(f"{where}: {model_type} cannot convert exactly: {'; '.join(problems)}{first}.")


def arch_from_hf_config(cfg: dict) -> Arch:
    return Arch(**families.arch_fields(cfg))


def vocab_divisor(vocab_size: int) -> int:
    """The --make-vocab-size-divisible-by that adds no padding: the largest power of two dividing
    the vocabulary, at most 128."""
    return min(vocab_size & -vocab_size, 128)


def megatron_flags(cfg: dict, hf_dir: str) -> List[str]:
    """``pretrain_gpt_lora.py`` model flags that rebuild this Hugging Face model exactly."""
    check_hf_config(cfg)
    arch = arch_from_hf_config(cfg)
    theta, _ = families.rope(cfg)
    flags = ["--num-layers", arch.num_layers, "--hidden-size", arch.hidden_size,
             "--ffn-hidden-size", arch.ffn_hidden_size, "--num-attention-heads", arch.num_heads]
    if arch.num_groups != arch.num_heads:
        flags.append("--group-query-attention")
    flags += ["--num-query-groups", arch.num_groups, "--kv-channels", arch.head_dim, "--swiglu",
              "--normalization", "RMSNorm", "--norm-epsilon", repr(float(families.default(cfg, "rms_norm_eps"))),
              "--position-embedding-type", "rope", "--rotary-base", int(theta),
              "--max-position-embeddings", cfg.get("max_position_embeddings", 2048),
              "--disable-bias-linear"]
    if arch.qkv_bias:
        flags.append("--add-qkv-bias")
    if arch.qk_norm:
        flags.append("--qk-layernorm")
    if arch.num_experts:
        flags += ["--num-experts", arch.num_experts, "--moe-router-topk", arch.moe_topk,
                  "--moe-ffn-hidden-size", arch.moe_ffn_hidden_size]
        if arch.moe_pre_softmax:  # Qwen3-MoE with norm_topk_prob=false
            flags.append("--moe-router-pre-softmax")
    if not arch.tied:
        flags.append("--untie-embeddings-and-output-weights")
    # --vocab-size: the embedding rows, which may exceed len(tokenizer) (e.g. Qwen2)
    flags += ["--vocab-size", arch.vocab_size, "--make-vocab-size-divisible-by", vocab_divisor(arch.vocab_size),
              "--hidden-dropout", "0", "--attention-dropout", repr(float(cfg.get("attention_dropout", 0.0))),
              "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir]
    return [str(f) for f in flags]


def check_parallel_layout(arch: Arch, tp: int, pp: int, ep: int = 1, etp: Optional[int] = None) -> None:
    """The divisibility a TP x PP (x EP x ETP, for experts; ETP defaults to TP) load of this model
    needs, checked before converting."""
    etp = tp if etp is None else etp
    if min(tp, pp, ep, etp) < 1:
        raise ConversionError(f"parallel sizes must be >= 1, found TP={tp} PP={pp} EP={ep} ETP={etp}.")
    if not arch.num_experts and (ep > 1 or etp != tp):
        raise ConversionError(f"EP={ep} / ETP={etp} lay out experts, and this {arch.model_type} model is dense; "
                              "drop the expert-parallel sizes.")
    sizes = [("attention heads", arch.num_heads, "TP", tp),
             ("key/value heads (query groups)", arch.num_groups, "TP", tp),
             ("ffn hidden size", arch.ffn_hidden_size, "TP", tp), ("vocabulary", arch.vocab_size, "TP", tp),
             ("layers", arch.num_layers, "PP", pp)]
    if arch.num_experts:
        sizes += [("experts", arch.num_experts, "EP", ep),
                  ("expert ffn hidden size", arch.moe_ffn_hidden_size, "ETP", etp)]
    problems = [f"{what} {n} does not divide by {kind}={size}" for what, n, kind, size in sizes if n % size]
    if problems:
        layout = f"TP={tp} PP={pp}" + (f" EP={ep} ETP={etp}" if arch.num_experts else "")
        raise ConversionError(f"this model cannot load at {layout}: {'; '.join(problems)}. "
                              "Choose sizes that divide them.")


def hf_config_for(arch: Arch, model_args: dict, dtype: str) -> dict:
    """A config.json that transformers loads as this model, in the family ``arch.model_type``
    (when no original config is given)."""
    return families.config_json(arch, model_args["norm_epsilon"], model_args["rotary_base"],
                                model_args["max_position_embeddings"], dtype)


def check_hf_config_matches(cfg: dict, arch: Arch, where: str, other: str = "checkpoint") -> None:
    """An original config.json given for a Megatron model must describe the same sizes."""
    check_hf_config(cfg, where)
    theirs = arch_from_hf_config(cfg)
    diffs = [f"{k} {getattr(theirs, k)} vs {getattr(arch, k)}" for k in Arch.__dataclass_fields__
             if getattr(theirs, k) != getattr(arch, k)]
    if diffs:
        raise ConversionError(f"{where} describes another model than the {other} "
                              f"({'; '.join(diffs)}, config vs {other}); pass the model's own config.")


# -------------------------------------------------------------------- Megatron model_args

def arch_from_model_args(model_args: dict, where: str = "model_args.json") -> Arch:
    """Sizes of a Megatron checkpoint, refusing what no supported Hugging Face family can express."""
    experts = model_args.get("num_experts") or 0
    qk_norm, qkv_bias = bool(model_args.get("qk_layernorm")), bool(model_args.get("add_qkv_bias"))
    pre_softmax = bool(model_args.get("moe_router_pre_softmax")) and bool(experts)
    problems = [f"{flag} {model_args.get(key)!r} (need {want!r})"
                for key, flag, want in (("swiglu", "--swiglu", True), ("normalization", "--normalization", "RMSNorm"),
                                        ("position_embedding_type", "--position-embedding-type", "rope"),
                                        ("add_bias_linear", "--disable-bias-linear: add_bias_linear", False),
                                        ("moe_shared_expert_intermediate_size",
                                         "--moe-shared-expert-intermediate-size (a shared expert)", None))
                if model_args.get(key) != want]
    if qkv_bias and (qk_norm or experts):
        problems.append("--add-qkv-bias with --qk-layernorm or --num-experts (only Qwen2 has q/k/v biases)")
    if pre_softmax and not qk_norm:
        problems.append("--moe-router-pre-softmax without --qk-layernorm (Mixtral renormalises its top-k "
                        "weights; Qwen3-MoE, with q/k norms, can leave them)")
    if problems:
        raise ConversionError(f"{where}: not a Llama-family model ({'; '.join(problems)}); only SwiGLU + RMSNorm "
                              "+ RoPE models without linear biases (Qwen2: q/k/v biases) and, with experts, "
                              "without a shared expert convert to Hugging Face / PEFT.")
    heads = model_args["num_attention_heads"]
    moe = {}
    if experts:
        moe = dict(num_experts=experts, moe_topk=model_args["moe_router_topk"], moe_pre_softmax=pre_softmax,
                   moe_ffn_hidden_size=model_args.get("moe_ffn_hidden_size") or model_args["ffn_hidden_size"])
    return Arch(num_layers=model_args["num_layers"], hidden_size=model_args["hidden_size"],
                ffn_hidden_size=model_args["ffn_hidden_size"], num_heads=heads,
                num_groups=model_args.get("num_query_groups") or heads,
                head_dim=model_args.get("kv_channels") or model_args["hidden_size"] // heads,
                vocab_size=model_args["padded_vocab_size"],
                tied=not model_args["untie_embeddings_and_output_weights"],
                qkv_bias=qkv_bias, qk_norm=qk_norm, **moe)


# --------------------------------------------------------------------------- tensor names

def megatron_shapes(arch: Arch) -> Dict[str, Tuple[int, ...]]:
    """Every logical Megatron base tensor a Hugging Face model of ``arch`` maps to, with its
    shape, in pipeline order (embedding, layers, final norm, output layer), so a stream can
    follow the stages. Within a layer: norms, attention, then the MLP (router, each expert)."""
    h, e = arch.hidden_size, arch.num_experts
    out = {GLOBAL_NAMES["model.embed_tokens.weight"]: (arch.vocab_size, h)}
    for i in range(arch.num_layers):
        p = f"decoder.layers.{i}."
        out.update({f"{p}{norm}.weight": (h,) for norm in NORMS.values()})
        out[f"{p}self_attention.linear_qkv.weight"] = arch.module_shape("self_attention.linear_qkv")
        if arch.qkv_bias:
            out[f"{p}self_attention.linear_qkv.bias"] = arch.module_shape("self_attention.linear_qkv")[:1]
        if arch.qk_norm:
            out.update({f"{p}self_attention.{norm}.weight": (arch.head_dim,) for norm in QK_NORMS})
        out[f"{p}self_attention.linear_proj.weight"] = arch.module_shape("self_attention.linear_proj")
        if not e:
            out.update({f"{p}{m}.weight": arch.module_shape(m) for m in ("mlp.linear_fc1", "mlp.linear_fc2")})
            continue
        out[f"{p}mlp.router.weight"] = (e, h)
        for x in range(e):
            for leaf in FUSED_EXPERTS:
                module = f"mlp.experts.local_experts.{x}.{leaf}"
                out[f"{p}{module}.weight"] = arch.module_shape(module)
    out[GLOBAL_NAMES["model.norm.weight"]] = (h,)
    if not arch.tied:
        out[GLOBAL_NAMES["lm_head.weight"]] = (arch.vocab_size, h)
    return out


def megatron_names(arch: Arch) -> List[str]:
    """Every logical Megatron base tensor a Hugging Face export of ``arch`` reads, in pipeline
    order (see :func:`megatron_shapes`)."""
    return list(megatron_shapes(arch))


def hf_shapes(arch: Arch, fused: bool = False) -> Dict[str, Tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``arch`` holds, with its shape: experts one by
    one as ``save_pretrained`` writes them, or (``fused``) as transformers 5 holds them in memory."""
    out = {}
    for name, shape in megatron_shapes(arch).items():
        if fused and (name.endswith(".mlp.router.weight") or ".mlp.experts." in name):
            if name.endswith(".mlp.router.weight"):  # the layer's three fused tensors in its place
                e, h, i = arch.num_experts, arch.hidden_size, arch.moe_ffn_hidden_size
                p = f"model.layers.{_LAYER_NAME.match(name).group(1)}.mlp."
                out.update({f"{p}gate.weight": (e, h), f"{p}experts.{FUSED_EXPERTS['linear_fc1']}": (e, 2 * i, h),
                            f"{p}experts.{FUSED_EXPERTS['linear_fc2']}": (e, h, i)})
            continue
        meta = torch.empty(shape, device="meta")  # the split, without data
        out.update({hf_name: tuple(t.shape) for hf_name, t in hf_from_megatron_tensor(name, meta, arch)})
    return out


def fused_experts(names: Iterable[str]) -> bool:
    """Whether a checkpoint holds its experts fused (``mlp.experts.gate_up_proj``)."""
    return any(n.endswith(f".mlp.experts.{FUSED_EXPERTS['linear_fc1']}") for n in names)


def check_hf_tensors(found: Dict[str, Tuple[int, ...]], arch: Arch, where: str) -> None:
    """Names and shapes of a Hugging Face checkpoint against its config (experts in either layout)."""
    expected = hf_shapes(arch, fused=fused_experts(found))
    if arch.tied:
        found = {k: v for k, v in found.items() if k != "lm_head.weight"}  # some tied checkpoints store it
    found = {k: v for k, v in found.items() if not k.endswith(IGNORED_HF_SUFFIXES)}
    missing = sorted(set(expected) - set(found), key=_natural)
    unexpected = sorted(set(found) - set(expected), key=_natural)
    wrong = [f"{n}: expected {expected[n]}, found {tuple(found[n])}" for n in expected
             if n in found and tuple(found[n]) != expected[n]]
    more = lambda names: f"{names[:4]}{' ...' if len(names) > 4 else ''}"  # noqa: E731
    problems = ([f"missing {more(missing)}"] if missing else []) + \
               ([f"unexpected {more(unexpected)}"] if unexpected else []) + wrong[:4]
    if problems:
        raise ConversionError(f"{where} does not match its config.json ({arch.model_type}): {'; '.join(problems)}. "
                              "Pass an unmodified Hugging Face checkpoint of the supported architectures.")


# Every tensor name some supported family has, for naming what a checkpoint of another family holds.
_ANY_FAMILY = re.compile(
    r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight|model\.layers\.\d+\.("
    r"(input|post_attention)_layernorm\.weight|self_attn\.[qkv]_proj\.(weight|bias)|self_attn\.o_proj\.weight|"
    r"self_attn\.[qk]_norm\.weight|mlp\.(gate|up|down)_proj\.weight|mlp\.gate\.weight|"
    r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight|mlp\.experts\.(gate_up|down)_proj|"
    r"block_sparse_moe\.gate\.weight|block_sparse_moe\.experts\.\d+\.w[123]\.weight))$")


def _natural(name: str) -> list:
    """Sort key: layer and expert numbers as numbers (layer 2 before layer 10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _first_unsupported(names: Optional[Iterable[str]], arch: Optional[Arch]) -> str:
    """'; first unsupported tensor NAME' of a checkpoint: the first (by layer) that ``arch`` has
    no place for in either expert layout, or (no arch: another family) that no supported family has."""
    if names is None:
        return ""
    if arch is None:
        odd = [n for n in names if not _ANY_FAMILY.match(n) and not n.endswith(IGNORED_HF_SUFFIXES)]
    else:
        known = set(hf_shapes(arch)) | set(hf_shapes(arch, fused=True)) | {"lm_head.weight"}
        odd = [n for n in names if n not in known and not n.endswith(IGNORED_HF_SUFFIXES)]
    return f"; first unsupported tensor {min(odd, key=_natural)}" if odd else ""


def megatron_from_hf(get: Callable[[str], torch.Tensor], arch: Arch,
                     fused: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """(Megatron name, tensor) for every base tensor in pipeline order, fusing per layer;
    ``get(hf_name)`` reads one. ``fused``: the checkpoint holds transformers' in-memory expert
    layout (:func:`fused_experts`): each layer's two expert tensors are read once, then sliced."""
    layer_tensors: Dict[str, torch.Tensor] = {}
    for name in megatron_names(arch):
        module = _LAYER_NAME.match(name)
        expert = module and _EXPERT.match(module.group(2))
        if fused and module and (expert or module.group(2) == "mlp.router"):
            p = f"model.layers.{module.group(1)}.mlp."
            if not expert:
                yield name, get(f"{p}gate.weight")
                continue
            hf_name = f"{p}experts.{FUSED_EXPERTS[expert.group(2)]}"
            if hf_name not in layer_tensors:
                if not any(k.startswith(p) for k in layer_tensors):
                    layer_tensors.clear()  # keep one layer's fused experts at a time
                layer_tensors[hf_name] = get(hf_name)
            yield name, layer_tensors[hf_name][int(expert.group(1))]
            continue
        parts = [get(n) for n in hf_names_of(name, arch)]
        yield name, arch.fuse(module.group(2), parts) if len(parts) > 1 else parts[0]


_HF_OF_GLOBAL = {name: hf_name for hf_name, name in GLOBAL_NAMES.items()}
_HF_OF_NORM = {norm: hf_norm for hf_norm, norm in NORMS.items()}
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_names_of(name: str, arch: Optional[Arch] = None) -> List[str]:
    """The Hugging Face name(s) of one logical Megatron base tensor, fused parts in fused order.

    Router and expert tensors need ``arch`` (their names depend on the family); an expert's
    ``linear_fc1`` maps to that expert's two per-expert tensors (gate, up), as written on disk."""
    if name in _HF_OF_GLOBAL:
        return [_HF_OF_GLOBAL[name]]
    m = _LAYER_NAME.match(name)
    if m:
        p, module, kind = f"model.layers.{m.group(1)}.", m.group(2), m.group(3)
        qk_norm = module[len("self_attention."):] if module.startswith("self_attention.") else None
        expert = _EXPERT.match(module)
        if module in _HF_OF_NORM and kind == "weight":
            return [f"{p}{_HF_OF_NORM[module]}.weight"]
        if qk_norm in QK_NORMS and kind == "weight":
            return [f"{p}self_attn.{QK_NORMS[qk_norm]}.weight"]
        if module in MODULES:
            parent, parts = MODULES[module]
            return [f"{p}{parent}.{part}.{kind}" for part in parts]
        if (expert or module == "mlp.router") and kind == "weight":
            if arch is None or not arch.num_experts:
                raise ConversionError(f"{name} is a mixture-of-experts tensor: its Hugging Face name depends on "
                                      "the family; pass the model's Arch (hf_names_of(name, arch)).")
            parent, leaves = EXPERTS[arch.model_type]
            if not expert:
                return [f"{p}{parent}.gate.weight"]
            return [f"{p}{parent}.experts.{expert.group(1)}.{part}.weight" for part in leaves[expert.group(2)]]
    raise ConversionError(f"{name} has no Hugging Face counterpart; expected one of the names "
                          "megatron_names(arch) lists.")


def hf_from_megatron_tensor(name: str, tensor: torch.Tensor, arch: Arch) -> List[Tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) pairs of one logical Megatron base tensor: a fused linear is
    split into its projections (views where the rows are contiguous; an expert's ``linear_fc1``
    into that expert's gate and up), anything else renamed.
    The one mapping of the file export (:func:`hf_from_megatron`) and the in-memory stream."""
    hf_names = hf_names_of(name, arch)
    if len(hf_names) == 1:
        return [(hf_names[0], tensor)]
    module = _LAYER_NAME.match(name).group(2)
    return list(zip(hf_names, arch.split(module, tensor)))


def hf_from_megatron(state: Dict[str, torch.Tensor], arch: Arch) -> Dict[str, torch.Tensor]:
    """Hugging Face tensors from a logical (TP=1) Megatron base state dict (inverse of the above)."""
    out = {}
    for name in megatron_names(arch):
        out.update(hf_from_megatron_tensor(name, state[name], arch))
    return out
