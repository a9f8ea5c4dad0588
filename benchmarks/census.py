"""CPU census of what LoRA adds to one layer's forward + backward (issues 16, 25): aten ops, bytes
touched and bytes saved for backward, LoRA layer minus the frozen base layer.

    python -m benchmarks.census                       # from the repo root; ~1 min on 2 cores
    python -m benchmarks.census --tp 1 --json c.json  # TP=1 only; the measurements as JSON too

``--out PATH`` also writes the markdown table; the shape flags (``--seq``, ``--batch``,
``--hidden``, ``--out-features``, ``--ffn``, ``--heads``, ``--groups``, ``--rank``, ``--alpha``,
``--experts``, ``--topk``, ``--moe-ffn``, ``--empty-experts``) default to ``DEFAULT_SHAPE``;
``--targets`` picks rows.

Rows (fp32, one call each):

    column   ``LoRAColumnParallelLinear`` vs Megatron's ``ColumnParallelLinear`` (in -> out, no bias)
    row      ``LoRARowParallelLinear`` vs Megatron's ``RowParallelLinear`` (in -> out, input parallel)
    layer    the one ``TransformerLayer`` of a small GPT (RMSNorm, SwiGLU, GQA, RoPE, no biases) from
             ``megatron_lora.training.gpt.build_gpt_stage``: frozen base vs ``apply_lora`` on
             linear_qkv / linear_proj / linear_fc1 / linear_fc2
    moe      the same layer with Megatron's MoE MLP (issue 25): a top-``topk`` router (softmax, no
             aux loss, never adapted), the all-to-all dispatcher and ``experts`` SequentialMLP
             experts of SwiGLU ffn ``moe_ffn`` (default 8, top-2, 128); expert-TP = TP, EP = 1;
             ``apply_lora`` on the four targets, every expert's linear_fc1 / linear_fc2 included

each at TP=1 and at TP=2 (two real gloo ranks through ``tests.distributed.launcher``), the latter
without and with sequence parallelism; the moe row only at TP=1 and TP=2 SP: Megatron's MoE layer
refuses TP > 1 without SP in training, so "TP=2" has no moe row (the table says so). Every GPT
build (base, control, each variant) reseeds torch and Megatron's RNG tracker first, so all draw
the same base weights and, for moe, the same router: every build routes each token to the same
experts (the run stops if the tokens per expert differ), and ``base_vs_base`` stays zero.
SequentialMLP runs every local expert, one that got no token too (its GEMMs dispatch on empty
operands), so the adapted linear calls of a moe forward are 2 + 2 x experts, each with the same
six branch GEMMs; ``--empty-experts K`` shuts the last K experts out (Megatron's router expert
bias at -1e4, which needs sigmoid scores: the router then scores by sigmoid) to measure that case.

Each LoRA row once per entry of ``VARIANTS`` (LoRAConfig overrides: adding a variant is one line;
an entry naming a field the installed ``LoRAConfig`` lacks is skipped and listed as skipped, so
the script also measures code from before that field; a variant the package refuses at a row, by
a ``ValueError`` when it is built, is listed under the row's ``refused`` with the message: DoRA on
the moe row at TP=2 SP, whose expert linear_fc2 at expert-TP 2 is reduced by the dispatcher). Base weights are frozen, the layer's
input requires grad (so the base's backward computes dX only), the LoRA factors are trainable,
dropout is 0 and ``branch_kernels`` keeps its default (on the CPU "auto" is plain torch). Each
variant is built, runs one warm-up call, and then one call is measured: forward, then backward
with a fixed random dY through ``torch.autograd.grad`` for the input and the trainable parameters
(returned, not accumulated into ``.grad``: a leaf's AccumulateGrad copies a gradient it cannot
take over, e.g. a non-contiguous dX, which a layer inside a network does not pay):

* **aten ops**: every op a ``TorchDispatchMode`` sees during forward + backward, by name
  (``mm``, ``addmm_``, ``mul`` ...). Ops that move no data are listed apart (``no_data_ops``)
  and not counted: ops whose result aliases an input (view, t, transpose, expand, as_strided,
  _reshape_alias, detach, slice, split ...), ``_unsafe_view`` (matmul's reshape of a fresh mm
  output) and allocations (empty, empty_strided, new_empty_strided ...). Collectives (namespace
  ``c10d``) are counted apart; their local helpers (the cat around a rider, a clone, a copy) are
  aten ops and counted like any other.
* **bytes touched**: per counted op (collectives included), the bytes of its tensor inputs plus
  its tensor outputs; an in-place op's mutated tensor is an input and an output, so it counts as
  read and written. A tensor counts its distinct elements (a stride-0 broadcast dimension counts
  once). Shown as a multiple of the layer's (input + output) activation bytes (``layer`` row: of
  the four adapted linears' input + output bytes, summed; ``moe`` row: of the adapted linears'
  input + output bytes summed over every call, i.e. qkv, proj and each expert's fc1 and fc2 at
  the tokens that expert got), in total and without the bytes of tensors shaped like a 2-D
  parameter of the layer or its transpose (the frozen weight, the LoRA factors, their
  gradients): "activation-shaped", which includes the rank-r activations. The
  split is by shape, so the default shape keeps the token count per rank (192; 96 under SP), and
  each expert's token count, apart from every weight dimension; a shape where they meet shows "?".
* **saved for backward**: the storages that ``torch.autograd.graph.saved_tensors_hooks`` sees
  packed during forward, deduplicated by storage (``data_ptr``), parameters excluded, counted at
  their storage's full size (what a saved view keeps alive). Shown as a multiple of the layer's
  input activation bytes (``layer`` / ``moe`` rows: the adapted linears' input bytes summed, i.e.
  the branch inputs); "of which the input" is the part that is the layer's own input storage.

"Extra" is always LoRA minus base, same layout, same shapes. A second, separately built base is
measured against the first as a control (``base_vs_base``: zero by construction). TP=2 rows show
rank 0; both ranks are measured and the table says if their op counts differ.

JSON (``--json``): ``{"rows": [...], "shape": {...}, "variants": [names], "skipped_variants":
[names], "meta": {torch, megatron_core, megatron_lora (the package measured), git_head,
uncommitted, date, dtype, branch_kernels}}``; a row is ``{layout, tp, sp, target, input_bytes,
output_bytes, linear_calls (adapted linear calls per forward), base, base_vs_base, variants:
{name: {lora, extra}}, ranks_agree}`` (moe rows add ``tokens_per_expert``, rank 0's) where ``base`` /
``lora`` are measurements ``{ops, collectives, no_data_ops (name -> count), bytes_touched,
bytes_by_name, param_shaped_bytes, saved_bytes, saved_input_bytes, param_split_ambiguous}`` and
``extra`` / ``base_vs_base`` are differences ``{aten_ops, aten_ops_by_name, collectives,
collectives_by_name, no_data_ops, bytes_touched, param_shaped_bytes, saved_bytes,
saved_input_bytes, bytes_touched_x_activations, activation_shaped_bytes_x_activations,
saved_x_input}``; a row whose build of a variant was refused has ``refused: {name: message}``.

Caveats. These are CPU aten ops, not GPU kernels: a fused or Triton kernel is one launch for
several aten ops, cuBLAS / Transformer Engine may pick other GEMM forms, and the CPU has no
launch cost to speak of. Bytes are the logical bytes an op's arguments name, not DRAM traffic
(caches, a GEMM's re-reads of its operands and the allocator are not modelled; an argument the
kernel ignores still counts, e.g. the ``self`` of an ``addmm`` with ``beta=0``). Saved bytes are
what autograd holds, not an allocator peak. A collective's bytes are the local buffers it reads
and writes, not the wire. Gradients are returned, not accumulated: with DDP's main_grad
buffers (gradient-accumulation fusion) each factor gradient costs one more add. Tensors a layer
keeps for backward outside ``save_for_backward`` (as attributes of ``ctx``) are not seen by the
saved-tensor hooks. The base is Megatron's frozen path (``LinearWithFrozenWeight``): it keeps only
the weight for backward and runs no weight-gradient GEMM. The moe row runs SequentialMLP, one
expert after the other: the GPU path of grouped experts (``TEGroupedMLP``, one grouped GEMM per
factor) is not what it counts.
"""

import argparse
import dataclasses
import datetime
import os
import subprocess
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.report import emit  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

# seq, micro-batch, the per-linear layer's in / out features, the GPT's hidden / ffn / heads /
# query groups, LoRA rank and alpha (LoRAConfig(rank, alpha, dropout=0.0)); the MoE layer's experts,
# router top-k and expert ffn (``moe`` row), and how many of its experts get no token (the last
# ones; see ``_gpt_layer``). Tokens per rank
# (192, or 96 under SP) differ from every weight dimension, so that a [tokens, features]
# activation is never mistaken for a parameter-shaped tensor (see OpCensus).
DEFAULT_SHAPE = dict(seq=64, batch=3, hidden=256, out_features=512, ffn=512, heads=8, groups=4, rank=16, alpha=32,
                     experts=8, topk=2, moe_ffn=128, empty_experts=0)
# (name, LoRAConfig overrides): one LoRA row per entry and layout; adding a variant is one line.
VARIANTS = [
    ("lora", {}),
    ("lora recompute_branch_input", {"recompute_branch_input": True}),
    ("dora", {"use_dora": True}),
]
# (name, TP size, sequence parallel)
LAYOUTS = [("TP=1", 1, False), ("TP=2", 2, False), ("TP=2 SP", 2, True)]
TARGETS = ("column", "row", "layer", "moe")
# Megatron's MoE layer refuses TP > 1 without sequence parallelism in training: no such moe row.
MOE_NEEDS_SP = "Megatron's MoE layer needs sequence parallelism at TP > 1 in training"
VOCAB = 64  # the GPT's embedding / output layer are built but never run
SEED = 1234  # of every GPT build (the base weights, the router)

# Ops that move no data: not counted, listed apart (see the module docstring).
NO_DATA_OPS = {"_unsafe_view", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
               "lift_fresh"}


def _op_name(func) -> str:
    name = func.overloadpacket.__name__
    return name if func.namespace == "aten" else f"{func.namespace}.{name}"


def _moves_no_data(func) -> bool:
    """A view (result aliases an input and nothing is written) or an allocation."""
    if func.overloadpacket.__name__ in NO_DATA_OPS:
        return True
    schema = func._schema
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return False  # in place / out=
    return bool(schema.returns) and all(r.alias_info is not None for r in schema.returns)


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor names (a stride-0 dimension counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(obj):
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


class OpCensus(TorchDispatchMode):
    """Counts the ops dispatched inside it and the bytes each reads and writes.

    ``param_shapes``: shapes (and transposed shapes) of the layer's parameters; a tensor of such a
    shape (a weight, a LoRA factor, a factor's gradient) counts in ``param_bytes`` as well.
    """

    def __init__(self, param_shapes=()):
        super().__init__()
        self.ops, self.collectives, self.no_data = Counter(), Counter(), Counter()
        self.bytes = Counter()  # per op name (counted ops and collectives)
        self.param_bytes = 0
        self.param_shapes = {tuple(s) for s in param_shapes} | {tuple(s)[::-1] for s in param_shapes}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        if _moves_no_data(func):
            self.no_data[name] += 1
            return out
        (self.ops if func.namespace == "aten" else self.collectives)[name] += 1
        for t in _tensors((args, kwargs)) + _tensors(out):
            nbytes = _distinct_bytes(t)
            self.bytes[name] += nbytes
            if tuple(t.shape) in self.param_shapes:
                self.param_bytes += nbytes
        return out


def _backward(y, x, dy, params):
    """dY -> the gradients of ``x`` and of the trainable ``params``, returned, not accumulated.

    ``torch.autograd.grad`` rather than ``backward``: AccumulateGrad would copy a gradient into a
    leaf's ``.grad`` whenever it cannot take it over (a non-contiguous view, such as the column
    layer's dX inside the reduced ``[dX | dY B]`` message, or a tensor the gloo work object still
    references, at random): copies that a layer inside a network does not make."""
    return torch.autograd.grad(y, [x] + [p for p in params if p.requires_grad], dy)


def measure(call, x, dy, params):
    """Census of ``call(x)`` forward + backward with ``dy``; ``params``' storages are not 'saved'."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    input_ptr = x.untyped_storage().data_ptr()
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    census = OpCensus([p.shape for p in params if p.dim() == 2])
    with census:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = call(x)
        _backward(y, x, dy, params)
    return dict(ops=dict(census.ops), collectives=dict(census.collectives), no_data_ops=dict(census.no_data),
                bytes_touched=sum(census.bytes.values()), bytes_by_name=dict(census.bytes),
                param_shaped_bytes=census.param_bytes, saved_bytes=sum(saved.values()),
                saved_input_bytes=saved.get(input_ptr, 0))


def _diff(a: dict, b: dict) -> dict:
    """``a - b`` per key, zeros dropped."""
    return {k: a.get(k, 0) - b.get(k, 0) for k in sorted(set(a) | set(b)) if a.get(k, 0) != b.get(k, 0)}


def extra(lora: dict, base: dict, act_in: int, act_out: int) -> dict:
    """LoRA minus base, with the ratios the table shows."""
    ops = _diff(lora["ops"], base["ops"])
    e = dict(aten_ops=sum(ops.values()), aten_ops_by_name=ops,
             collectives=sum(lora["collectives"].values()) - sum(base["collectives"].values()),
             collectives_by_name=_diff(lora["collectives"], base["collectives"]),
             no_data_ops=sum(lora["no_data_ops"].values()) - sum(base["no_data_ops"].values()),
             bytes_touched=lora["bytes_touched"] - base["bytes_touched"],
             param_shaped_bytes=lora["param_shaped_bytes"] - base["param_shaped_bytes"],
             saved_bytes=lora["saved_bytes"] - base["saved_bytes"],
             saved_input_bytes=lora["saved_input_bytes"] - base["saved_input_bytes"])
    e["bytes_touched_x_activations"] = e["bytes_touched"] / (act_in + act_out)
    e["activation_shaped_bytes_x_activations"] = (e["bytes_touched"] - e["param_shaped_bytes"]) / (act_in + act_out)
    e["saved_x_input"] = e["saved_bytes"] / act_in
    return e


# --------------------------------------------------------------------------- the rank side


def _frozen(module):
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _lora_config(shape, overrides):
    from megatron_lora import LoRAConfig

    return LoRAConfig(rank=shape["rank"], alpha=shape["alpha"], dropout=0.0, **overrides)


def _linear(kind, lora_cfg, tp, sp, shape):
    """A base (``lora_cfg`` None) or LoRA column / row linear of ``shape``, base weights frozen."""
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_lora import LoRAColumnParallelLinear, LoRARowParallelLinear

    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True)
    kw = dict(config=cfg, init_method=lambda w: torch.nn.init.normal_(w, std=0.02), bias=False,
              skip_bias_add=False)
    if kind == "column":
        kw["gather_output"] = False
    else:
        kw["input_is_parallel"] = True
    if lora_cfg is None:
        cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
        return _frozen(cls(shape["hidden"], shape["out_features"], **kw))
    cls = LoRAColumnParallelLinear if kind == "column" else LoRARowParallelLinear
    layer = cls(shape["hidden"], shape["out_features"], lora_config=lora_cfg,
                lora_init_name=f"decoder.layers.0.census_{kind}", **kw)
    for name in ("weight", "bias"):
        if getattr(layer, name, None) is not None:
            getattr(layer, name).requires_grad_(False)
    return layer


def _gpt_layer(lora_cfg, tp, sp, shape, moe=False):
    """The one TransformerLayer of a small GPT stage (LoRA on all four targets if ``lora_cfg``;
    ``moe``: its MLP is Megatron's MoE layer, SequentialMLP experts, whose linear_fc1 / linear_fc2
    are targets too), and the rotary embedding its forward needs.

    Torch's and Megatron's RNGs are reseeded first, so every build of a shape draws the same base
    weights: the MoE row's router (frozen, never adapted) then routes every token alike in the
    base, the control and each LoRA build (B = 0 at init)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_lora import apply_lora
    from megatron_lora.training.gpt import build_gpt_stage
    from tests.distributed.models import tiny_gpt_config

    empty = shape["empty_experts"] if moe else 0
    if not 0 <= empty <= shape["experts"] - shape["topk"]:
        raise ValueError(f"--empty-experts must be between 0 and experts - topk = "
                         f"{shape['experts'] - shape['topk']}, got {empty}.")
    moe_fields = dict(num_moe_experts=shape["experts"], moe_router_topk=shape["topk"],
                      moe_ffn_hidden_size=shape["moe_ffn"], moe_aux_loss_coeff=0.0,
                      moe_token_dispatcher_type="alltoall") if moe else {}
    if empty:  # Megatron's expert bias (selection only, sigmoid scores in (0, 1)) shuts experts out
        moe_fields.update(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    config = tiny_gpt_config(tp=tp, sp=sp, num_layers=1, hidden_size=shape["hidden"],
                             ffn_hidden_size=shape["ffn"], num_attention_heads=shape["heads"],
                             num_query_groups=shape["groups"], **moe_fields)
    model_parallel_cuda_manual_seed(SEED)
    torch.manual_seed(SEED)
    model = build_gpt_stage(config, VOCAB, shape["seq"], position_embedding_type="rope",
                            share_embeddings_and_output_weights=False)
    if empty:
        model.decoder.layers[0].mlp.router.expert_bias[-empty:] = -1e4
    if lora_cfg is None:
        model.requires_grad_(False)
    else:
        apply_lora(model, lora_cfg)
    return model.decoder.layers[0], model.rotary_pos_emb(shape["seq"])


def _input_shape(target, tp, sp, shape):
    """This rank's input and output shapes ([s, b, h] Megatron layout)."""
    s, b = shape["seq"], shape["batch"]
    if target == "column":
        return [s // tp if sp else s, b, shape["hidden"]], [s, b, shape["out_features"] // tp]
    if target == "row":
        return [s, b, shape["hidden"] // tp], [s // tp if sp else s, b, shape["out_features"]]
    local = [s // tp if sp else s, b, shape["hidden"]]
    return local, local


def _linear_activations(layer, call, x):
    """{name: (input bytes, output bytes)} of each Megatron parallel linear inside ``layer`` that
    ran during ``call(x)`` (an expert's linears run even with 0 tokens: 0 bytes), and the number
    of calls."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    acts, calls = {}, Counter()

    def hook(name):
        def record(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            acts[name] = (args[0].numel() * args[0].element_size(), out.numel() * out.element_size())
            calls[name] += 1
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layer.named_modules()
               if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    with torch.no_grad():
        call(x)
    for h in handles:
        h.remove()
    return acts, sum(calls.values())


def _expert_tokens(layer, call, x):
    """Tokens each local expert of a MoE ``layer`` received in ``call(x)`` (its linear_fc1's rows),
    in expert order."""
    tokens = {}
    experts = layer.mlp.experts.local_experts
    handles = [e.linear_fc1.register_forward_hook(
        lambda m, args, out, i=i: tokens.__setitem__(i, args[0].shape[0])) for i, e in enumerate(experts)]
    with torch.no_grad():
        call(x)
    for h in handles:
        h.remove()
    return [tokens.get(i) for i in range(len(experts))]


def _one(target, lora_cfg, tp, sp, shape, x0, dy):
    """Build one variant, warm it up, measure it: (measurement, input bytes, output bytes,
    adapted-linear calls per forward, tokens per local expert or None)."""
    if target in ("layer", "moe"):
        layer, rope = _gpt_layer(lora_cfg, tp, sp, shape, moe=target == "moe")
        call = lambda x: layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)[0]  # noqa: E731
    else:
        layer = _linear(target, lora_cfg, tp, sp, shape)
        call = lambda x: layer(x)[0]  # noqa: E731
    warm = x0.clone().requires_grad_(True)
    _backward(call(warm), warm, dy, list(layer.parameters()))  # first-call work stays out of the census
    x = x0.clone().requires_grad_(True)
    result = measure(call, x, dy, list(layer.parameters()))
    expert_tokens = _expert_tokens(layer, call, x0) if target == "moe" else None
    # The param-shaped split is by shape: it is ambiguous if a token count is a weight dimension
    # (an expert's token count included).
    dims = {d for p in layer.parameters() if p.dim() == 2 for d in p.shape}
    token_counts = {x0.shape[0] * x0.shape[1], shape["seq"] * shape["batch"]} | set(expert_tokens or ())
    result["param_split_ambiguous"] = bool(dims & token_counts)
    if target in ("layer", "moe"):
        acts, calls = _linear_activations(layer, call, x0)
        act_in, act_out = sum(a for a, _ in acts.values()), sum(b for _, b in acts.values())
    else:
        act_in, act_out, calls = x0.numel() * x0.element_size(), dy.numel() * dy.element_size(), 1
    return result, act_in, act_out, calls, expert_tokens


def available_variants():
    """(variants the installed LoRAConfig supports, names of those it does not)."""
    from megatron_lora import LoRAConfig

    fields = {f.name for f in dataclasses.fields(LoRAConfig)}
    ok = [(n, o) for n, o in VARIANTS if set(o) <= fields]
    return ok, [n for n, o in VARIANTS if not set(o) <= fields]


def _rank_worker(layouts, targets, shape):
    """Runs on every rank (after ``run_distributed``'s setup): one dict per (layout, target);
    no moe row at TP > 1 without SP (``MOE_NEEDS_SP``)."""
    from tests.distributed.models import tp_rank

    tp, _ = tp_rank()
    variants, _ = available_variants()
    out = []
    for layout, sp in layouts:
        for target in targets:
            if target == "moe" and tp > 1 and not sp:
                continue
            torch.manual_seed(0)  # every rank draws the same full tensors; shapes are per rank
            x_shape, y_shape = _input_shape(target, tp, sp, shape)
            x0, dy = torch.randn(x_shape), torch.randn(y_shape)
            base, act_in, act_out, calls, tokens = _one(target, None, tp, sp, shape, x0, dy)
            control, *_, control_tokens = _one(target, None, tp, sp, shape, x0, dy)  # a second base: all zero
            row = dict(layout=layout, tp=tp, sp=sp, target=target, input_bytes=act_in,
                       output_bytes=act_out, linear_calls=calls, base=base,
                       base_vs_base=extra(control, base, act_in, act_out), variants={})
            if tokens is not None:
                row["tokens_per_expert"] = tokens
            routed = [control_tokens]
            for name, overrides in variants:
                try:
                    lora, _, _, _, lora_tokens = _one(target, _lora_config(shape, overrides), tp, sp, shape, x0, dy)
                except ValueError as err:  # the package refuses this variant here (its message says why)
                    row.setdefault("refused", {})[name] = str(err)
                    continue
                row["variants"][name] = dict(lora=lora, extra=extra(lora, base, act_in, act_out))
                routed.append(lora_tokens)
            if any(t != tokens for t in routed):
                raise RuntimeError(f"{layout} {target}: the builds route differently (tokens per expert "
                                   f"{tokens} in the base, {routed} in the control and the LoRA variants); "
                                   "they must draw the same router weights (see _gpt_layer).")
            out.append(row)
    return out


# --------------------------------------------------------------------------- the driver


def _git_head(path):
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _uncommitted(path):
    """Files of the package that differ from the git HEAD (the census measures the work tree)."""
    try:
        out = subprocess.run(["git", "-C", path, "status", "--porcelain", "--", "megatron_lora"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line[3:] for line in out.splitlines()]


def _strip_ops(row):
    """(ops, collectives) per rank row, to compare ranks."""
    return [(v["lora"]["ops"], v["lora"]["collectives"]) for v in row["variants"].values()] + \
        [(row["base"]["ops"], row["base"]["collectives"])]


def run_census(tps=(1, 2), targets=TARGETS, shape=None, timeout=900):
    """The census: ``dict(rows=[...], shape, skipped_variants, meta)`` (see the module docstring)."""
    import megatron.core

    import megatron_lora
    from tests.distributed.launcher import run_distributed

    shape = dict(DEFAULT_SHAPE, **(shape or {}))
    rows = []
    for tp in tps:
        layouts = [(name, sp) for name, t, sp in LAYOUTS if t == tp]
        if not layouts:
            raise ValueError(f"no layout with TP={tp}; known: {[name for name, _, _ in LAYOUTS]}")
        ranks = run_distributed(_rank_worker, tp, layouts, list(targets), shape, tp=tp, timeout=timeout)
        for i, row in enumerate(ranks[0]):
            row["ranks_agree"] = all(_strip_ops(r[i]) == _strip_ops(row) for r in ranks)
            if not row["ranks_agree"]:
                row["ops_per_rank"] = [_strip_ops(r[i]) for r in ranks]
            rows.append(row)
    _, skipped = available_variants()
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(megatron_lora.__file__)))
    from megatron_lora import LoRAConfig

    meta = dict(torch=torch.__version__, megatron_core=megatron.core.__version__,
                megatron_lora=os.path.abspath(megatron_lora.__file__), git_head=_git_head(pkg),
                uncommitted=_uncommitted(pkg), date=datetime.date.today().isoformat(), dtype="float32",
                branch_kernels=getattr(LoRAConfig(), "branch_kernels", None))
    return dict(rows=rows, shape=shape, variants=[n for n, _ in VARIANTS], skipped_variants=skipped,
                meta=meta)


def _breakdown(by_name: dict) -> str:
    if not by_name:
        return "-"
    items = sorted(by_name.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} x{v}" for k, v in items)


def format_table(result) -> str:
    sh, meta = result["shape"], result["meta"]
    lines = [
        f"# LoRA census: extra work of one LoRA layer's forward + backward over the frozen base ({meta['date']})",
        "",
        f"- code: `{meta['megatron_lora']}` (git {meta['git_head']}); torch {meta['torch']}, megatron-core "
        f"{meta['megatron_core']}, CPU, {meta['dtype']}, branch_kernels={meta['branch_kernels']}"
        + (f"; uncommitted: {', '.join(meta['uncommitted'])}" if meta.get("uncommitted") else ""),
        f"- seq {sh['seq']}, batch {sh['batch']}; column / row: in {sh['hidden']} -> out {sh['out_features']}; layer: "
        f"hidden {sh['hidden']}, ffn {sh['ffn']} (SwiGLU), {sh['heads']} heads / {sh['groups']} query groups, "
        f"RMSNorm, RoPE, no biases; LoRA rank {sh['rank']}, alpha {sh['alpha']}, dropout 0",
        f"- moe: the layer with Megatron's MoE MLP instead: {sh['experts']} SequentialMLP experts of ffn "
        f"{sh['moe_ffn']} (SwiGLU), top-{sh['topk']}, all-to-all dispatcher, no aux loss, expert-TP = TP, "
        "EP 1; LoRA on every expert's linear_fc1 / linear_fc2 too; no row at TP=2 without SP ("
        + MOE_NEEDS_SP + ")",
        "- input requires grad, base weights frozen; act = the layer's (input + output) activation bytes, "
        "in = its input bytes (layer: summed over the four adapted linears; moe: over qkv, proj and "
        "each expert's fc1 and fc2, as many tokens as it got)",
    ]
    if result["skipped_variants"]:
        lines.append(f"- skipped (field absent from this LoRAConfig): {', '.join(result['skipped_variants'])}")
    lines += [
        "",
        "| layout | layer | variant | base aten ops | extra aten ops | extra ops by name | extra collectives "
        "| extra bytes touched (x act) | of which activation-shaped (x act) | extra saved for backward (x in) "
        "| of which the input (x in) |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        for name, v in row["variants"].items():
            e = v["extra"]
            coll = e["collectives"] if not e["collectives_by_name"] else \
                f"{e['collectives']} ({_breakdown(e['collectives_by_name'])})"
            ambiguous = v["lora"]["param_split_ambiguous"] or row["base"]["param_split_ambiguous"]
            act_shaped = "?" if ambiguous else f"{e['activation_shaped_bytes_x_activations']:.2f}"
            own_input = ("-" if row["target"] in ("layer", "moe")
                         else f"{e['saved_input_bytes'] / row['input_bytes']:.2f}")
            lines.append(
                f"| {row['layout']} | {row['target']} | {name} | {sum(row['base']['ops'].values())} | "
                f"{e['aten_ops']} | {_breakdown(e['aten_ops_by_name'])} | {coll} | "
                f"{e['bytes_touched_x_activations']:.2f} | {act_shaped} | {e['saved_x_input']:.2f} | {own_input} |")
    refused = [f"{name} at {r['layout']} {r['target']} ({message})" for r in result["rows"]
               for name, message in r.get("refused", {}).items()]
    if refused:
        lines += ["", "Refused by the package, so not measured: " + "; ".join(refused)]
    routing = [f"{r['layout']}: {r['tokens_per_expert']}" for r in result["rows"] if "tokens_per_expert" in r]
    if routing:
        lines += ["", "moe tokens per expert (rank 0; the same in every build): " + "; ".join(routing)]
    disagree = [f"{r['layout']} {r['target']}" for r in result["rows"] if not r.get("ranks_agree", True)]
    lines += ["", "Ops that move no data (views, _unsafe_view, allocations) are not counted; collectives "
              "(c10d) are counted apart. Activation-shaped = bytes touched minus those of tensors shaped "
              "like a weight or LoRA factor (their reads and gradients). TP=2 rows show rank 0"
              + (f"; ranks DIFFER on: {', '.join(disagree)}." if disagree else "; both ranks agree.")]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2], choices=[1, 2], help="TP sizes to run")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    for key, value in DEFAULT_SHAPE.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--json", help="also write the measurements to this file as JSON")
    args = ap.parse_args(argv)
    shape = {k: getattr(args, k) for k in DEFAULT_SHAPE}
    result = run_census(tuple(args.tp), tuple(args.targets), shape)
    emit(format_table(result), result, args.out, args.json)


if __name__ == "__main__":
    # Re-enter through the package, so the rank function pickles as benchmarks.census.*
    from benchmarks.census import main as _main

    _main()
