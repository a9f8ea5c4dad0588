"""Model-level worker: a tiny GQA + SwiGLU + RMSNorm GPT with LoRA on all four targets.

Every layout starts from the SAME base weights (one TP=1 state dict, sliced per rank by the
declared layout: ``linear_fc1`` as [gate_i; up_i], QKV by whole query groups) because Megatron's
own initialisation differs between layouts (docs/design.md §11).
"""

from __future__ import annotations

import contextlib

import torch

from megatron_lora.core.layers import LORA_FACTORS, is_lora_key
from tests.distributed.models import build_tiny_gpt, tiny_gpt_config, tp_rank
from tests.distributed.shapes import SEQ_LEN, TINY_GPT, VOCAB_SIZE

MODEL = dict(num_attention_heads=8, num_query_groups=4)  # GQA that still divides by TP=4
BATCH = 2
TARGETS = 4  # linear_qkv, linear_proj, linear_fc1, linear_fc2
ADAPTER_TENSORS = TINY_GPT["num_layers"] * TARGETS * len(LORA_FACTORS)  # layers x targets x factors
_base_states = {}


def lora_cfg():
    from megatron_lora import LoRAConfig

    return LoRAConfig(rank=4, alpha=8, seed=99)


def base_state(config_overrides=None):
    """``base_state_worker``'s state dict, run once per test session for each ``config_overrides``
    (called in the pytest process)."""
    from tests.distributed.launcher import run_distributed

    key = repr(config_overrides)
    if key not in _base_states:
        _base_states[key] = run_distributed(base_state_worker, 1, config_overrides)[0]
    return _base_states[key]


def base_state_worker(config_overrides=None):
    """TP=1: the reference base weights (Megatron init, fixed seed; linear biases, which Megatron
    initialises to zero, drawn at random so that they matter)."""
    model = build_tiny_gpt(tiny_gpt_config(**{**MODEL, **(config_overrides or {})}))
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    g = torch.Generator().manual_seed(5)
    for k in state:
        if k.endswith(("linear_qkv.bias", "linear_proj.bias", "linear_fc1.bias", "linear_fc2.bias")):
            state[k] = torch.randn(state[k].shape, generator=g) * 0.1
    return state


def _base_partition(name: str, param):
    """(dim, gated) of a base parameter, from Megatron's TP attributes and the MLP layout."""
    if not getattr(param, "tensor_model_parallel", False):
        return None, False
    return param.partition_dim, name.endswith(("linear_fc1.weight", "linear_fc1.bias"))


# The TE spec fuses the two per-layer norms into the linears that follow them.
_LOCAL_NAME_OF_TE_NORM = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                          "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def _local_name(name: str) -> str:
    for te_suffix, local_suffix in _LOCAL_NAME_OF_TE_NORM.items():
        if name.endswith(te_suffix):
            return name[: -len(te_suffix)] + local_suffix
    return name


def load_base(model, full_state: dict, fc1_layout: str = "gated", qkv_layout: str = "grouped"):
    """Copy this rank's slice of each logical base tensor into ``model`` (local or TE spec).

    ``fc1_layout="naive"`` / ``qkv_layout="thirds"`` are deliberately wrong slicings the harness
    tests use to prove that a layout bug is caught.
    """
    from megatron_lora.core.inject import global_module_names
    from megatron_lora.core.layout import shard_tensor

    tp, rank = tp_rank()
    # PP stages number their layers from 0: name every parameter by its GLOBAL layer index.
    params = {f"{module_name}.{p_name}": p for module, module_name in global_module_names(model).items()
              for p_name, p in module.named_parameters(recurse=False)}
    with torch.no_grad():
        for name, param in params.items():
            if is_lora_key(name):
                continue
            full = full_state[_local_name(name)]
            dim, gated = _base_partition(name, param)
            if name.endswith("linear_qkv.weight") and qkv_layout == "thirds" and tp > 1:
                # The classic mistake: read the fused rows as [Q; K; V] blocks and shard each.
                c = model.config
                q_rows, kv_rows = c.num_attention_heads * c.kv_channels, c.num_query_groups * c.kv_channels
                blocks = full.split([q_rows, kv_rows, kv_rows])
                param.copy_(torch.cat([b.chunk(tp, 0)[rank] for b in blocks]))
                continue
            param.copy_(shard_tensor(full, dim, rank, tp, gated=gated and fc1_layout == "gated"))


def batches(steps):
    """Two fixed batches, cycled: the adapter can fit them, so the loss visibly falls."""
    g = torch.Generator().manual_seed(2024)
    tokens = torch.randint(0, VOCAB_SIZE, (2, BATCH, SEQ_LEN + 1), generator=g)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens[torch.arange(steps) % 2]]


def positions(inputs):
    """Position ids of a token batch ``[b, s]``: 0 .. s-1 in every row."""
    return torch.arange(inputs.shape[1]).unsqueeze(0).expand(inputs.shape[0], -1)


def logits(model, inputs):
    """This rank's logits of ``inputs`` (no gradient)."""
    with torch.no_grad():
        return model(inputs, positions(inputs), None).detach().clone()


def _loss(model, inputs, labels, rows=slice(None)):
    inputs, labels = inputs[rows], labels[rows]
    return model(inputs, positions(inputs), None, labels=labels).float().mean()


def local_adapter(model):
    """{qualified name: local tensor} of every LoRA factor (and DoRA magnitude) on this rank."""
    from megatron_lora.core.inject import lora_modules

    out = {}
    for m in lora_modules(model):
        for f in m.lora_tensor_names():
            out[f"{m.lora_init_name}.{f}"] = (getattr(m, f).detach().clone(),
                                              m.lora_layout.partition_dim(f), m.lora_layout.gated)
    return out


def build_lora_gpt(full_state, sp=False, path="apply", cfg=None, fc1_layout="gated",
                   qkv_layout="grouped", config_overrides=None, transformer_impl="local", load=True,
                   **gpt_kwargs):
    """The tiny GPT at this process group's TP/PP layout, base loaded (unless ``load=False``),
    LoRA applied.

    ``path="spec"`` builds LoRA layers from the LoRA spec; "apply" builds Megatron's plain spec
    and lets ``apply_lora`` convert its layers.
    """
    from megatron.core import parallel_state as ps

    from megatron_lora import apply_lora, get_gpt_lora_layer_spec

    cfg = cfg or lora_cfg()
    config = tiny_gpt_config(tp=tp_rank()[0], pp=ps.get_pipeline_model_parallel_world_size(), sp=sp,
                             **{**MODEL, **(config_overrides or {})})
    spec = None
    if path == "spec":
        norm = {"normalization": "RMSNorm"} if transformer_impl == "local" else {}  # TE: from config
        spec = get_gpt_lora_layer_spec(cfg, transformer_impl=transformer_impl, **norm)
    model = build_tiny_gpt(config, layer_spec=spec, transformer_impl=transformer_impl, **gpt_kwargs)
    if load:
        load_base(model, full_state, fc1_layout, qkv_layout)
    return apply_lora(model, cfg)


def train_worker(full_state, options):
    """``train(full_state, **options)`` for run_distributed (whose kwargs go to Megatron)."""
    return train(full_state, **options)


def plain_train(model, steps, lr=1e-2, first_step=0):
    """AdamW on the LoRA factors in a plain PyTorch loop; returns the losses."""
    from megatron_lora import lora_parameters

    opt = torch.optim.AdamW(lora_parameters(model), lr=lr, weight_decay=0.01)
    losses = []
    for inputs, labels in batches(first_step + steps)[first_step:]:
        opt.zero_grad()
        loss = _loss(model, inputs, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train(full_state, sp=False, steps=10, loop="plain", path="apply", fc1_layout="gated",
          qkv_layout="grouped", breakage=contextlib.nullcontext, lr=1e-2, grad_fusion=False, overlap=False,
          transformer_impl="local", config_overrides=None, cfg=None):
    """Train LoRA ``steps`` AdamW steps; returns losses, grad norms and the local adapter.

    ``breakage``: a context manager of ``breakages`` to train under (the harness tests).
    ``cfg``: the LoRAConfig (default ``lora_cfg()``).

    ``grad_fusion``: Megatron's gradient_accumulation_fusion (LoRA factors write ``main_grad``
    themselves; switched on after the build, which on CPU refuses it for want of apex's kernel,
    unused here because the base is frozen). ``overlap``: DDP's overlap_grad_reduce. The DDP loop
    runs each step as two micro-batches, so accumulation into ``main_grad`` is exercised.
    """
    if sp and loop == "plain":
        raise ValueError("under SP replicated factors get sequence-chunk partial gradients that "
                         "finalize_model_grads sums: use loop='ddp'")
    with breakage():
        model = build_lora_gpt(full_state, sp=sp, path=path, cfg=cfg, fc1_layout=fc1_layout, qkv_layout=qkv_layout,
                               transformer_impl=transformer_impl, config_overrides=config_overrides)
        if loop == "plain":
            losses, norms = plain_train(model, steps, lr), []
        else:
            losses, norms = ddp_train(model, steps, lr, grad_fusion, overlap)
    from megatron_lora.core.inject import lora_modules

    return dict(losses=losses, norms=norms, adapter=local_adapter(model),
                lora_classes=sorted({type(m).__name__ for m in lora_modules(model)}))


def ddp_train(model, steps, lr, grad_fusion, overlap):
    """Megatron's DDP + finalize_model_grads + optimizer, two micro-batches a step; losses, norms."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = model.config
    config.gradient_accumulation_fusion = grad_fusion
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(overlap_grad_reduce=overlap),
                                  module=model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.01, clip_grad=0.0), [ddp])
    losses, norms = [], []
    for inputs, labels in batches(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = 0.0
        for half in range(2):  # Megatron's schedules sync grads on the last micro-batch only
            rows = slice(half * BATCH // 2, (half + 1) * BATCH // 2)
            with ddp.no_sync() if half == 0 else contextlib.nullcontext():
                part = _loss(ddp, inputs, labels, rows) / 2
                part.backward()
            loss += part.detach()
        finalize_model_grads([ddp])  # waits for the overlapped reduction too
        _, grad_norm, _ = opt.step()
        losses.append(loss.item())
        norms.append(float(grad_norm))
    return losses, norms


def logical_adapter(per_rank: list, unshard_gated: bool = True):
    """Gather the ranks' local adapters into logical tensors by each factor's declared layout."""
    from megatron_lora.core.layout import unshard_tensors

    out = {}
    for name, (_, dim, gated) in per_rank[0]["adapter"].items():
        shards = [r["adapter"][name][0] for r in per_rank]
        out[name] = unshard_tensors(shards, dim, gated=gated and unshard_gated)
    return out


# ------------------------------------------------------------------ comparisons in the pytest process

def assert_same_trajectory(got, ref):
    """Loss (or grad norm) trajectories equal to ~1e-5 relative."""
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=0)


def assert_same_logical_adapter(ranks: list, ref_ranks: list, rtol=1e-4, atol=1e-5, tensors=ADAPTER_TENSORS):
    """The ranks' gathered logical adapter equals the reference run's, every factor of every
    target of every layer present (``tensors`` of them); returns the reference's."""
    ref, got = logical_adapter(ref_ranks), logical_adapter(ranks)
    assert got.keys() == ref.keys() and len(ref) == tensors
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")
    return ref


def replicated_mismatches(ranks: list) -> list:
    """Names of the replicated (not TP-sharded) factors that are not bitwise rank 0's on some rank."""
    return [key for key, (tensor, dim, _) in ranks[0]["adapter"].items()
            if dim is None and not all(torch.equal(r["adapter"][key][0], tensor) for r in ranks[1:])]
