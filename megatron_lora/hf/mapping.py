"""Hugging Face Llama-family <-> Megatron-Core GPT: configs, tensor names and fused row layouts.

Pure functions on dicts and tensors (torch only: no Megatron, transformers or peft import), so
each is unit-tested alone; ``hf_adapters`` maps PEFT adapters and ``convert`` does the I/O.

Per layer, Megatron fuses what Hugging Face keeps apart (logical, TP=1 tensors)::

    HF (LlamaForCausalLM / Qwen2ForCausalLM)      Megatron-Core GPTModel (local spec)
    self_attn.{q,k,v}_proj  ──fuse_qkv──►          self_attention.linear_qkv   [(H + 2G)·d, h]
    self_attn.o_proj                               self_attention.linear_proj  [h, H·d]
    mlp.{gate,up}_proj      ──cat──►               mlp.linear_fc1              [2f, h] = [gate; up]
    mlp.down_proj                                  mlp.linear_fc2              [h, f]
    input_layernorm / post_attention_layernorm     input_layernorm / pre_mlp_layernorm

``linear_qkv`` rows are grouped per query group (H heads, G groups, head dim d); group g holds
its H/G query heads, then its key head, then its value head. Worked example, H=4, G=2, d=16::

    rows  0-31 q heads 0,1 | 32-47 k0 | 48-63 v0 | 64-95 q heads 2,3 | 96-111 k1 | 112-127 v1

Reading them as ``[Q; K; V]`` blocks still trains, but is a different model (docs/design.md
§10, trap 6). TP then splits whole groups, and ``linear_fc1`` per shard as ``[gate_i; up_i]``
(``core/layout.py``).
HF Llama's ``rotate_half`` RoPE is Megatron's non-interleaved RoPE, so q/k rows copy unpermuted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch

SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

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
GLOBAL_NAMES = {"model.embed_tokens.weight": "embedding.word_embeddings.weight",
                "model.norm.weight": "decoder.final_layernorm.weight",
                "lm_head.weight": "output_layer.weight"}
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry


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
        """[out, in] of a fused Megatron linear (``self_attention.linear_qkv`` ...)."""
        shapes = self.part_shapes()
        parts = MODULES[module][1]
        return sum(shapes[p][0] for p in parts), shapes[parts[0]][1]

    def fuse(self, module: str, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """HF parts (rows first) -> the Megatron fused tensor, for weights, biases and LoRA B."""
        if module == "self_attention.linear_qkv":
            return fuse_qkv(*parts, num_heads=self.num_heads, num_groups=self.num_groups)
        return torch.cat(list(parts), dim=0) if len(parts) > 1 else parts[0]

    def split(self, module: str, fused: torch.Tensor) -> List[torch.Tensor]:
        """Inverse of :meth:`fuse`."""
        if module == "self_attention.linear_qkv":
            return split_qkv(fused, self.num_heads, self.num_groups)
        parts = MODULES[module][1]
        return [p.contiguous() for p in fused.chunk(len(parts), dim=0)] if len(parts) > 1 else [fused]


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

def _rope(cfg: dict) -> Tuple[float, str]:
    """(rope theta, rope type) from a transformers 4.x (rope_theta / rope_scaling) or 5.x
    (rope_parameters) config."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return theta, kind


def check_hf_config(cfg: dict, where: str = "config.json") -> None:
    """Refuse what the Megatron GPT of ``pretrain_gpt_lora.py`` cannot reproduce exactly."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"{where}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(f'{t} ({a})' for t, a in SUPPORTED_MODEL_TYPES.items())}.")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if not isinstance(cfg.get(k), int)]
    if missing:
        raise ConversionError(f"{where}: {', '.join(missing)} missing or not integers; "
                              "pass the model's own config.json.")
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg['hidden_act']!r} (only SwiGLU, 'silu', maps to --swiglu)")
    theta, kind = _rope(cfg)
    if kind != "default":
        problems.append(f"rope scaling {kind!r} (pretrain_gpt_lora.py has plain RoPE only)")
    if float(theta) != int(theta):
        problems.append(f"rope_theta {theta} (--rotary-base takes an integer)")
    if model_type == "llama" and cfg.get("attention_bias"):
        problems.append("attention_bias=true (bias on q/k/v AND o_proj; --add-qkv-bias covers q/k/v only)")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=true (the MLP has no bias here)")
    if cfg.get("use_sliding_window"):
        problems.append("use_sliding_window=true (attention here is full causal)")
    if any(t != "full_attention" for t in cfg.get("layer_types") or []):
        problems.append("layer_types with sliding-window attention (attention here is full causal)")
    heads, groups = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if heads % groups:
        problems.append(f"num_attention_heads {heads} not a multiple of num_key_value_heads {groups}")
    if problems:
        raise ConversionError(f"{where}: cannot convert exactly: {'; '.join(problems)}.")


def arch_from_hf_config(cfg: dict) -> Arch:
    heads = cfg["num_attention_heads"]
    default_tie = False  # LlamaConfig's and Qwen2Config's default
    return Arch(num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
                ffn_hidden_size=cfg["intermediate_size"], num_heads=heads,
                num_groups=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                vocab_size=cfg["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", default_tie)),
                qkv_bias=cfg["model_type"] == "qwen2")


def vocab_divisor(vocab_size: int) -> int:
    """The --make-vocab-size-divisible-by that adds no padding: the largest power of two dividing
    the vocabulary, at most 128."""
    return min(vocab_size & -vocab_size, 128)


def megatron_flags(cfg: dict, hf_dir: str) -> List[str]:
    """``pretrain_gpt_lora.py`` model flags that rebuild this Hugging Face model exactly."""
    check_hf_config(cfg)
    arch = arch_from_hf_config(cfg)
    theta, _ = _rope(cfg)
    flags = ["--num-layers", arch.num_layers, "--hidden-size", arch.hidden_size,
             "--ffn-hidden-size", arch.ffn_hidden_size, "--num-attention-heads", arch.num_heads]
    if arch.num_groups != arch.num_heads:
        flags.append("--group-query-attention")
    flags += ["--num-query-groups", arch.num_groups, "--kv-channels", arch.head_dim, "--swiglu",
              "--normalization", "RMSNorm", "--norm-epsilon", repr(float(cfg.get("rms_norm_eps", 1e-6))),
              "--position-embedding-type", "rope", "--rotary-base", int(theta),
              "--max-position-embeddings", cfg.get("max_position_embeddings", 2048),
              "--disable-bias-linear"]
    if arch.qkv_bias:
        flags.append("--add-qkv-bias")
    if not arch.tied:
        flags.append("--untie-embeddings-and-output-weights")
    # --vocab-size: the embedding rows, which may exceed len(tokenizer) (e.g. Qwen2)
    flags += ["--vocab-size", arch.vocab_size, "--make-vocab-size-divisible-by", vocab_divisor(arch.vocab_size),
              "--hidden-dropout", "0", "--attention-dropout", repr(float(cfg.get("attention_dropout", 0.0))),
              "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir]
    return [str(f) for f in flags]


def check_parallel_layout(arch: Arch, tp: int, pp: int) -> None:
    """The divisibility a TP x PP load of this model needs, checked before converting."""
    if tp < 1 or pp < 1:
        raise ConversionError(f"parallel sizes must be >= 1, found TP={tp} PP={pp}.")
    problems = [f"{what} {n} does not divide by {kind}={size}"
                for what, n, kind, size in (
                    ("attention heads", arch.num_heads, "TP", tp),
                    ("key/value heads (query groups)", arch.num_groups, "TP", tp),
                    ("ffn hidden size", arch.ffn_hidden_size, "TP", tp), ("vocabulary", arch.vocab_size, "TP", tp),
                    ("layers", arch.num_layers, "PP", pp))
                if n % size]
    if problems:
        raise ConversionError(f"this model cannot load at TP={tp} PP={pp}: {'; '.join(problems)}. "
                              "Choose sizes that divide them.")


def hf_config_for(arch: Arch, model_args: dict, dtype: str) -> dict:
    """A config.json that transformers loads as this model (when no original config is given)."""
    model_type = "qwen2" if arch.qkv_bias else "llama"
    cfg = dict(architectures=[SUPPORTED_MODEL_TYPES[model_type]], model_type=model_type,
               hidden_size=arch.hidden_size, intermediate_size=arch.ffn_hidden_size,
               num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
               num_key_value_heads=arch.num_groups, head_dim=arch.head_dim, hidden_act="silu",
               rms_norm_eps=model_args["norm_epsilon"], rope_theta=float(model_args["rotary_base"]),
               max_position_embeddings=model_args["max_position_embeddings"],
               vocab_size=arch.vocab_size, tie_word_embeddings=arch.tied, attention_dropout=0.0,
               torch_dtype=dtype)
    if model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    else:
        cfg.update(use_sliding_window=False)
    return cfg


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
    """Sizes of a Megatron checkpoint, refusing what no Llama-family HF model can express."""
    problems = [f"{flag} {model_args.get(key)!r} (need {want!r})"
                for key, flag, want in (("swiglu", "--swiglu", True), ("normalization", "--normalization", "RMSNorm"),
                                        ("position_embedding_type", "--position-embedding-type", "rope"),
                                        ("add_bias_linear", "--disable-bias-linear: add_bias_linear", False),
                                        ("num_experts", "--num-experts", None))
                if model_args.get(key) != want]
    if problems:
        raise ConversionError(f"{where}: not a Llama-family model ({'; '.join(problems)}); only "
                              "dense SwiGLU + RMSNorm + RoPE models without linear biases convert to Hugging Face / PEFT.")
    heads = model_args["num_attention_heads"]
    return Arch(num_layers=model_args["num_layers"], hidden_size=model_args["hidden_size"],
                ffn_hidden_size=model_args["ffn_hidden_size"], num_heads=heads,
                num_groups=model_args.get("num_query_groups") or heads,
                head_dim=model_args.get("kv_channels") or model_args["hidden_size"] // heads,
                vocab_size=model_args["padded_vocab_size"],
                tied=not model_args["untie_embeddings_and_output_weights"],
                qkv_bias=bool(model_args.get("add_qkv_bias")))


# --------------------------------------------------------------------------- tensor names

def hf_shapes(arch: Arch) -> Dict[str, Tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``arch`` holds, with its shape."""
    h = arch.hidden_size
    out = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tied:
        out["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        for norm in NORMS:
            out[f"{p}{norm}.weight"] = (h,)
        for module, (parent, parts) in MODULES.items():
            for part in parts:
                out[f"{p}{parent}.{part}.weight"] = arch.part_shapes()[part]
                if arch.qkv_bias and part in ("q_proj", "k_proj", "v_proj"):
                    out[f"{p}{parent}.{part}.bias"] = arch.part_shapes()[part][:1]
    return out


def check_hf_tensors(found: Dict[str, Tuple[int, ...]], arch: Arch, where: str) -> None:
    """Names and shapes of a Hugging Face checkpoint against its config."""
    expected = hf_shapes(arch)
    if arch.tied:
        found = {k: v for k, v in found.items() if k != "lm_head.weight"}  # some tied checkpoints store it
    found = {k: v for k, v in found.items() if not k.endswith(IGNORED_HF_SUFFIXES)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{n}: expected {expected[n]}, found {tuple(found[n])}" for n in expected
             if n in found and tuple(found[n]) != expected[n]]
    more = lambda names: f"{names[:4]}{' ...' if len(names) > 4 else ''}"  # noqa: E731
    problems = ([f"missing {more(missing)}"] if missing else []) + \
               ([f"unexpected {more(unexpected)}"] if unexpected else []) + wrong[:4]
    if problems:
        raise ConversionError(f"{where} does not match its config.json: {'; '.join(problems)}. "
                              "Pass an unmodified Hugging Face checkpoint of the supported architectures.")


def megatron_from_hf(get: Callable[[str], torch.Tensor], arch: Arch) -> Iterator[Tuple[str, torch.Tensor]]:
    """(Megatron name, tensor) for every base tensor, fusing per layer; ``get(hf_name)`` reads one.

    Yields the global tensors first, then layer by layer (a caller can report progress)."""
    for hf_name, name in GLOBAL_NAMES.items():
        if not (arch.tied and hf_name == "lm_head.weight"):
            yield name, get(hf_name)
    for i in range(arch.num_layers):
        for hf_norm, norm in NORMS.items():
            yield f"decoder.layers.{i}.{norm}.weight", get(f"model.layers.{i}.{hf_norm}.weight")
        for module, (parent, parts) in MODULES.items():
            names = [f"model.layers.{i}.{parent}.{part}" for part in parts]
            yield f"decoder.layers.{i}.{module}.weight", arch.fuse(module, [get(n + ".weight") for n in names])
            if arch.qkv_bias and module == "self_attention.linear_qkv":
                yield f"decoder.layers.{i}.{module}.bias", arch.fuse(module, [get(n + ".bias") for n in names])


def megatron_names(arch: Arch) -> List[str]:
    """Every logical Megatron base tensor a Hugging Face export of ``arch`` reads, in pipeline
    order (embedding, layers, final norm, output layer), so a stream can follow the stages."""
    names = [GLOBAL_NAMES["model.embed_tokens.weight"]]
    for i in range(arch.num_layers):
        names += [f"decoder.layers.{i}.{norm}.weight" for norm in NORMS.values()]
        for module in MODULES:
            names.append(f"decoder.layers.{i}.{module}.weight")
            if arch.qkv_bias and module == "self_attention.linear_qkv":
                names.append(f"decoder.layers.{i}.{module}.bias")
    names.append(GLOBAL_NAMES["model.norm.weight"])
    if not arch.tied:
        names.append(GLOBAL_NAMES["lm_head.weight"])
    return names


_HF_OF_GLOBAL = {name: hf_name for hf_name, name in GLOBAL_NAMES.items()}
_HF_OF_NORM = {norm: hf_norm for hf_norm, norm in NORMS.items()}
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_names_of(name: str) -> List[str]:
    """The Hugging Face name(s) of one logical Megatron base tensor, fused parts in fused order."""
    if name in _HF_OF_GLOBAL:
        return [_HF_OF_GLOBAL[name]]
    m = _LAYER_NAME.match(name)
    if m and m.group(2) in _HF_OF_NORM and m.group(3) == "weight":
        return [f"model.layers.{m.group(1)}.{_HF_OF_NORM[m.group(2)]}.weight"]
    if m and m.group(2) in MODULES:
        parent, parts = MODULES[m.group(2)]
        return [f"model.layers.{m.group(1)}.{parent}.{part}.{m.group(3)}" for part in parts]
    raise ConversionError(f"{name} has no Hugging Face counterpart; expected one of the names "
                          "megatron_names(arch) lists.")


def hf_from_megatron_tensor(name: str, tensor: torch.Tensor, arch: Arch) -> List[Tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) pairs of one logical Megatron base tensor: a fused linear is
    split into its projections (views where the rows are contiguous), anything else renamed.
    The one mapping of the file export (:func:`hf_from_megatron`) and the in-memory stream."""
    hf_names = hf_names_of(name)
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
