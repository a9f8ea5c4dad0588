"""Workers of the MoE proof (test_moe_lora.py): a tiny MoE GPT with LoRA on attention and experts.

Megatron's ``MoELayer`` (router, token dispatcher, ``SequentialMLP`` experts of the local spec),
4 experts, top-2, SwiGLU, 2 layers. Every layout starts from the SAME logical base: one TP=1 EP=1
checkpoint that ``save_base_worker`` writes with Megatron's ``dist_checkpointing`` and every layout
loads the same way, so Megatron itself reshards the experts over EP / ETP.

Data: every rank reads the SAME batch. Dense parameters then get the same gradient on every
data-parallel rank (averaging them changes nothing), and an expert receives one copy of each token
from each data-parallel rank, so its gradient is ``dp`` times the reference one: Megatron's DDP
scales expert gradients by ``1 / dp`` (and the plain loop here does the same), which gives back the
one-rank reference. The router's aux loss of each rank is computed on the whole batch too, so it
is the reference's.

Names: an expert's factors are keyed by the GLOBAL expert index, computed here from the EP rank
(``ep_rank * E / EP + local index``), independently of the names the package gives them.
"""

from __future__ import annotations

import contextlib
import re

import torch

from megatron_lora.core.layers import LORA_FACTORS
from tests.distributed.gpt_cases import batches, positions
from tests.distributed.models import build_tiny_gpt, tiny_gpt_config

EXPERTS = 4
TOPK = 2
RANK = 4
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
STARVED_EXPERT = 3  # the router never picks it on STARVED_STEP (``starve``)
STARVED_STEP = 1
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def lora_cfg(shared=False, dora=False):
    """``shared``: one adapter per layer shared by its experts (``expert_adapters="shared"``);
    ``dora``: DoRA (``use_dora``)."""
    from megatron_lora import LoRAConfig

    return LoRAConfig(rank=RANK, alpha=8, seed=99, target_modules=TARGETS,
                      expert_adapters="shared" if shared else "per_expert", use_dora=dora)


def moe_config(sp=False, dispatcher="alltoall", aux=True):
    """The tiny MoE GPT's TransformerConfig at this process group's TP / EP / ETP layout."""
    from megatron.core import parallel_state as ps

    return tiny_gpt_config(
        tp=ps.get_tensor_model_parallel_world_size(), sp=sp,
        num_moe_experts=EXPERTS, moe_router_topk=TOPK,
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        moe_token_dispatcher_type=dispatcher,
        moe_aux_loss_coeff=1e-2 if aux else 0.0,
        moe_router_load_balancing_type="aux_loss" if aux else "none",
    )


def _base_sharded(model):
    from megatron_lora.training.model_checkpoint import base_sharded_state_dict

    return base_sharded_state_dict(model)


def save_base_worker(path):
    """One rank, TP=1 EP=1: Megatron's init of the tiny MoE GPT, saved as a dist checkpoint."""
    from megatron.core import dist_checkpointing

    model = build_tiny_gpt(moe_config())
    dist_checkpointing.save(_base_sharded(model), path)
    return sorted(k for k in model.state_dict() if "experts" in k and not k.endswith("_extra_state"))


def load_base(model, path):
    """The logical base of ``path`` at this rank's layout (Megatron reshards the experts)."""
    from megatron.core import dist_checkpointing

    from megatron_lora.core.checkpoint.dist_state import copy_loaded

    sharded = _base_sharded(model)
    copy_loaded(sharded, dist_checkpointing.load(sharded, path))


# ------------------------------------------------------------------------------ router and probes

class Probe:
    """Forces and records the routing: ``starve(True)`` makes the router never pick
    STARVED_EXPERT (its logit minus 1e4, before top-k); every experts call records its tokens per
    (global) expert."""

    def __init__(self, model):
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_layer import MoELayer

        self.starving = False
        self.tokens = []  # per experts call: {global expert: tokens}
        ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
        local = EXPERTS // ep
        for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
            router = layer.router
            router.gating = self._gating(router.gating)
            layer.experts.register_forward_pre_hook(self._record(ep_rank * local), with_kwargs=True)

    def _gating(self, gating):
        def forced(x):
            logits = gating(x)
            if not self.starving:
                return logits
            penalty = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
            penalty[STARVED_EXPERT] = 1e4
            return logits - penalty
        return forced

    def _record(self, first):
        def hook(module, args, kwargs):
            counts = args[1] if len(args) > 1 else kwargs["tokens_per_expert"]
            counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
            self.tokens.append({first + i: int(c) for i, c in enumerate(counts)})
        return hook

    @contextlib.contextmanager
    def starve(self, on=True):
        self.starving = on
        try:
            yield
        finally:
            self.starving = False


# ------------------------------------------------------------------------------------ adapter view

def logical_key(module_name: str, first_local_expert: int) -> str:
    """``module_name`` with its local expert index replaced by the global one."""
    return _LOCAL_EXPERT.sub(lambda m: f".local_experts.{first_local_expert + int(m.group(1))}.", module_name)


def local_adapter(model):
    """{logical key: (local tensor, partition dim, gated, shard rank, shard world)} of every LoRA
    factor on this rank (shard = the rank's place in the layer's own TP / expert-TP group), and
    {logical key: the package's init name}."""
    from megatron.core import parallel_state as ps

    from megatron_lora.core import collectives as C
    from megatron_lora.core.inject import _LORA_TYPES

    first = ps.get_expert_model_parallel_rank() * (EXPERTS // ps.get_expert_model_parallel_world_size())
    out, names = {}, {}
    for name, m in model.named_modules():
        if not isinstance(m, _LORA_TYPES):
            continue
        key = logical_key(name, first)
        names[key] = m.lora_init_name
        for f in m.lora_tensor_names():
            out[f"{key}.{f}"] = (getattr(m, f).detach().clone(), m.lora_layout.partition_dim(f),
                                 m.lora_layout.gated, C.group_rank(m.lora_group), C.group_size(m.lora_group))
    return out, names


def full_logits(model, inputs):
    """Logits ``[b, s, vocab]`` of the whole vocabulary (gathered over TP), no gradient."""
    from megatron.core import parallel_state as ps

    from megatron_lora.core import collectives as C

    with torch.no_grad():
        out = model(inputs, positions(inputs), None).detach()
    group = ps.get_tensor_model_parallel_group()
    return torch.cat(C.all_gather_list(out.contiguous(), group), dim=-1)


def _loss(model, inputs, labels):
    return model(inputs, positions(inputs), None, labels=labels).float().mean()


# ---------------------------------------------------------------------------------------- training


def plain_train(model, probe, steps, lr, shared=False):
    """AdamW on the factors; gradients reduced the way the layout needs them, by hand: dense
    factors averaged over the data-parallel group, expert factors summed over the expert-data-
    parallel group and divided by the data-parallel size (each rank sent its own copy of the
    batch). ``shared``: the experts share one adapter, replicated over expert-parallel ranks too:
    summed over the whole data-parallel group (EP x expert-DP at TP = 1) like a dense factor.
    TP = 1 only (under SP replicated factors need finalize_model_grads' sum)."""
    from megatron.core import parallel_state as ps

    from megatron_lora import lora_parameters

    if ps.get_tensor_model_parallel_world_size() > 1:
        raise ValueError("the plain loop is for TP = 1 layouts; use loop='ddp'")
    params = lora_parameters(model)
    experts = set() if shared else {id(p) for n, p in model.named_parameters() if ".experts." in n}
    dp = ps.get_data_parallel_world_size()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    losses = []
    for step, (inputs, labels) in enumerate(batches(steps)):
        opt.zero_grad()
        with probe.starve(step == STARVED_STEP):
            loss = _loss(model, inputs, labels)
            loss.backward()
        for p in params:
            group = ps.get_expert_data_parallel_group() if id(p) in experts else ps.get_data_parallel_group()
            if torch.distributed.get_world_size(group) > 1:
                torch.distributed.all_reduce(p.grad, group=group)
            p.grad /= dp
        opt.step()
        losses.append(loss.item())
    return losses


def ddp_train(model, probe, steps, lr, shared=False):
    """Megatron's DDP + finalize_model_grads + get_megatron_optimizer, one micro-batch a step."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), module=model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.01, clip_grad=0.0), [ddp])
    losses = []
    for step, (inputs, labels) in enumerate(batches(steps)):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        with probe.starve(step == STARVED_STEP):
            loss = _loss(ddp, inputs, labels)
            loss.backward()
        finalize_model_grads([ddp])
        opt.step()
        losses.append(loss.item())
    return losses


def run_worker(base_dir, options):
    """One layout's whole story, for run_distributed.

    Returns the frozen model's loss and logits, the adapter at init, the losses of ``steps``
    AdamW steps, the trained adapter, its logits, the tokens per expert of every experts call,
    and (``save``: a directory) saves the trained adapter with ``save_adapter``.
    """
    from megatron_lora import apply_lora

    opts = dict(sp=False, dispatcher="alltoall", aux=True, loop="plain", steps=4, lr=1e-2, save=None,
                unmark_expert_sp=False, shared=False, dora=False)
    opts.update(options)
    model = build_tiny_gpt(moe_config(opts["sp"], opts["dispatcher"], opts["aux"]))
    load_base(model, base_dir)
    probe = Probe(model)
    inputs, labels = batches(1)[0]
    with torch.no_grad():
        frozen_loss = _loss(model, inputs, labels).item()
    frozen_logits = full_logits(model, inputs)
    apply_lora(model, lora_cfg(opts["shared"], opts["dora"]))
    unmarked = 0
    if opts["unmark_expert_sp"]:  # the harness test: finalize_model_grads no longer sums them
        for name, p in model.named_parameters():
            if ".experts." in name and getattr(p, "sequence_parallel", False):
                p.sequence_parallel = False
                unmarked += 1
    init, names = local_adapter(model)
    train = plain_train if opts["loop"] == "plain" else ddp_train
    probe.tokens.clear()
    losses = train(model, probe, opts["steps"], opts["lr"], opts["shared"])
    tokens = list(probe.tokens)
    sharing = shared_factor_objects(model)
    adapter, _ = local_adapter(model)
    if opts["save"]:
        from megatron_lora.core.checkpoint.adapter import save_adapter

        save_adapter(model, opts["save"], iteration=opts["steps"])
    return dict(frozen_loss=frozen_loss, frozen_logits=frozen_logits, init=init, names=names,
                losses=losses, adapter=adapter, logits=full_logits(model, inputs), tokens=tokens,
                unmarked=unmarked, sharing=sharing)


def load_worker(base_dir, adapter_root, options):
    """A fresh LoRA model at this layout, the adapter of ``adapter_root`` loaded with
    ``load_adapter``: its adapter and logits."""
    from megatron_lora import apply_lora
    from megatron_lora.core.checkpoint.adapter import load_adapter

    opts = dict(sp=False, dispatcher="alltoall", aux=True, shared=False, full=False)
    opts.update(options)
    model = build_tiny_gpt(moe_config(opts["sp"], opts["dispatcher"], opts["aux"]))
    load_base(model, base_dir)
    apply_lora(model, lora_cfg(opts["shared"]))
    if opts["full"]:  # a safetensors file
        from megatron_lora.core.checkpoint.adapter import load_full_adapter

        load_full_adapter(model, adapter_root)
    else:
        load_adapter(model, adapter_root)
    inputs, _ = batches(1)[0]
    adapter, _ = local_adapter(model)
    return dict(adapter=adapter, logits=full_logits(model, inputs))


def shared_factor_objects(model):
    """Per (MoE layer, linear, factor) of this rank: how many distinct Parameter objects its
    local experts hold (1 when shared)."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, SequentialMLP):
            for leaf in ("linear_fc1", "linear_fc2"):
                for f in LORA_FACTORS:
                    out[f"{name}.{leaf}.{f}"] = len({id(getattr(getattr(e, leaf), f)) for e in m.local_experts})
    return out


def _fill_b(model):
    """Every lora_B (this rank's shard) set to values drawn from its logical name with the expert
    index dropped, so all experts of a layer get the same B, and two models the same ones."""
    from megatron.core import parallel_state as ps

    from megatron_lora.core.init import name_seed
    from megatron_lora.core.inject import _LORA_TYPES

    first = ps.get_expert_model_parallel_rank() * (EXPERTS // ps.get_expert_model_parallel_world_size())
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, _LORA_TYPES):
                key = _LOCAL_EXPERT.sub(".local_experts.*.", logical_key(name, first))
                gen = torch.Generator().manual_seed(name_seed(7, key))
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)


def shared_gradient_worker(base_dir, options):
    """One forward + backward of the same batch on two models from one base: the shared layout
    through Megatron's DDP + finalize_model_grads, and the per-expert layout with every expert's
    factors set to the shared ones (plain autograd, no reduction). Returns, per (layer, linear,
    factor), the shared factor's reduced gradient and the per-expert gradients summed over the
    local experts and then over ALL ranks, divided by the data-parallel size (each data-parallel
    replica read the same batch). Expert-TP 1 layouts (factors not sharded)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_lora import apply_lora

    sp = options.get("sp", False)
    inputs, labels = batches(1)[0]
    models = {}
    for shared in (True, False):
        model = build_tiny_gpt(moe_config(sp))
        load_base(model, base_dir)
        apply_lora(model, lora_cfg(shared))
        _fill_b(model)
        models[shared] = model
    moes = {s: [m for m in models[s].modules() if isinstance(m, SequentialMLP)] for s in models}
    with torch.no_grad():  # the per-expert model starts from the shared factors
        for shared_moe, per_moe in zip(moes[True], moes[False]):
            for leaf in ("linear_fc1", "linear_fc2"):
                for e in per_moe.local_experts:
                    for f in LORA_FACTORS:
                        getattr(getattr(e, leaf), f).copy_(getattr(getattr(shared_moe.local_experts[0], leaf), f))
    ddp = DistributedDataParallel(models[True].config, DistributedDataParallelConfig(), module=models[True])
    ddp.zero_grad_buffer()
    _loss(ddp, inputs, labels).backward()
    finalize_model_grads([ddp])
    _loss(models[False], inputs, labels).backward()
    dp = ps.get_data_parallel_world_size()
    out = {}
    for i, (shared_moe, per_moe) in enumerate(zip(moes[True], moes[False])):
        for leaf in ("linear_fc1", "linear_fc2"):
            for f in LORA_FACTORS:
                got = getattr(getattr(shared_moe.local_experts[0], leaf), f).main_grad.detach().clone()
                want = sum(getattr(getattr(e, leaf), f).grad for e in per_moe.local_experts).detach().clone()
                torch.distributed.all_reduce(want)
                out[f"{i}.{leaf}.{f}"] = (got, want / dp)
    return out


def collectives_worker(base_dir, options):
    """The collectives of one forward + backward, in call order, with the adapters on and off.

    The embedding output is made to require grad in both runs, so that the frozen base runs its
    whole backward (every layer's dX and its collectives) as the LoRA model does.
    """
    from megatron_lora import adapters_disabled, apply_lora
    from tests.collective_count import count_collectives

    opts = dict(sp=False, dispatcher="alltoall", aux=True)
    opts.update(options)
    model = build_tiny_gpt(moe_config(opts["sp"], opts["dispatcher"], opts["aux"]))
    load_base(model, base_dir)
    apply_lora(model, lora_cfg())
    model.embedding.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    inputs, labels = batches(1)[0]

    def calls():
        with count_collectives() as log:
            seq = []
            record = log.record

            def ordered(name, tensor):
                seq.append((name, tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0))
                record(name, tensor)

            log.record = ordered
            _loss(model, inputs, labels).backward()
        return seq

    lora = calls()
    with adapters_disabled(model):
        base = calls()
    return dict(lora=lora, base=base)


def dist_kwargs(layout: dict) -> dict:
    """``run_distributed``'s parallel-state keywords for a layout ``dict(tp=, ep=, etp=)``."""
    return dict(tp=layout.get("tp", 1), expert_model_parallel_size=layout.get("ep", 1),
                expert_tensor_parallel_size=layout.get("etp", 1))
