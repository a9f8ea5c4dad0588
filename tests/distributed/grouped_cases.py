"""Workers of test_grouped_experts.py: LoRA on grouped MoE experts (``core/grouped_experts.py``),
run in ranks started with ``te_double=True`` (Megatron's TEGroupedMLP on tests/te_double.py).

Layer level: the grouped ``linear_fc1`` / ``linear_fc2`` pair of one MoE layer, built from
logical (unsharded) per-expert weights made in the parent; each rank returns its shards of the
outputs and gradients, which the parent sums or concatenates by the layout and compares with a
plain per-expert reference. Model level: the tiny MoE GPT on the TE spec with grouped experts
against the local spec with SequentialMLP experts on the same base weights.
"""

from __future__ import annotations

import torch

from tests.distributed.models import tp_rank

EXPERTS, HIDDEN, FFN, RANK = 4, 16, 8, 4  # FFN: the per-expert ffn size; fc1 holds [gate; up]
M_SPLITS = [3, 0, 5, 2]  # tokens per local expert; expert 1 gets none
FC1_NAME = "decoder.layers.0.mlp.experts.linear_fc1"
FC2_NAME = "decoder.layers.0.mlp.experts.linear_fc2"


def layer_tensors(seed=7):
    """Logical tensors of the layer test: per-expert base weights, nonzero B's, inputs and output
    gradients (fc1 rows are [gate; up])."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    tokens = sum(M_SPLITS)
    return dict(w1=rnd(EXPERTS, 2 * FFN, HIDDEN), w2=rnd(EXPERTS, HIDDEN, FFN),
                b1=rnd(EXPERTS, 2 * FFN, RANK), b2=rnd(EXPERTS, HIDDEN, RANK),
                x1=rnd(tokens, HIDDEN), g1=rnd(tokens, 2 * FFN), x2=rnd(tokens, FFN), g2=rnd(tokens, HIDDEN))


def _layer_config(sp):
    from megatron.core.transformer import TransformerConfig

    tp, _ = tp_rank()
    return TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=FFN,
                             num_moe_experts=EXPERTS, moe_ffn_hidden_size=FFN, gated_linear_unit=True,
                             add_bias_linear=False, tensor_model_parallel_size=tp, expert_tensor_parallel_size=tp,
                             sequence_parallel=sp, use_cpu_initialization=True)


def _grouped_pair(lora_config, sp):
    from megatron_lora.core.grouped_experts import LoRATEColumnParallelGroupedLinear, LoRATERowParallelGroupedLinear

    common = dict(config=_layer_config(sp), init_method=torch.nn.init.zeros_, bias=False, is_expert=True,
                  lora_config=lora_config)
    fc1 = LoRATEColumnParallelGroupedLinear(EXPERTS, HIDDEN, 2 * FFN, skip_bias_add=False, tp_comm_buffer_name="fc1",
                                            lora_init_name=FC1_NAME, **common)
    fc2 = LoRATERowParallelGroupedLinear(EXPERTS, FFN, HIDDEN, skip_bias_add=True, tp_comm_buffer_name="fc2",
                                         lora_init_name=FC2_NAME, **common)
    return fc1, fc2


def _count_matmuls(fn):
    """(result, {aten matmul op: calls}) of ``fn()``: every GEMM dispatched, forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {}
    names = ("mm", "bmm", "addmm", "matmul", "baddbmm", "linear")

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in names:
                counts[name] = counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with Count():
        out = fn()
    return out, counts


def layer_worker(t, lora_config, sp):
    """This rank's shards of fc1's and fc2's outputs and gradients, the init check, the factors'
    reduction flags, the branch's GEMM calls, and the refusals."""
    from megatron_lora.core import collectives as C
    from megatron_lora.core.grouped_experts import grouped_lora_branch
    from megatron_lora.core.init import logical_lora_a
    from megatron_lora.core.layout import shard_tensor

    fc1, fc2 = _grouped_pair(lora_config, sp)
    world, rank = C.group_size(fc1.lora_group), C.group_rank(fc1.lora_group)
    out = {"world": world}
    # A of local expert j is the SequentialMLP expert j's (EP = 1: global index j), B starts at 0.
    out["init_matches_sequential"] = all(
        torch.equal(layer.lora_A[j], shard_tensor(logical_lora_a(
            layer.lora_logical_shape("lora_A"), lora_config.init, lora_config.seed,
            f"decoder.layers.0.mlp.experts.local_experts.{j}.{leaf}", lora_config.rank), a_dim, rank, world))
        for layer, leaf, a_dim in ((fc1, "linear_fc1", None), (fc2, "linear_fc2", 1)) for j in range(EXPERTS)
    ) and not fc1.lora_B.any() and not fc2.lora_B.any()
    with torch.no_grad():
        for j in range(EXPERTS):
            getattr(fc1, f"weight{j}").copy_(shard_tensor(t["w1"][j], 0, rank, world, gated=True))
            getattr(fc2, f"weight{j}").copy_(shard_tensor(t["w2"][j], 1, rank, world))
        fc1.lora_B.copy_(shard_tensor(t["b1"], 1, rank, world, gated=True))
        fc2.lora_B.copy_(t["b2"])
    for layer in (fc1, fc2):
        for p in layer.parameters():
            p.requires_grad_(p is layer.lora_A or p is layer.lora_B)
    x1 = t["x1"].clone().requires_grad_()
    x2 = shard_tensor(t["x2"], 1, rank, world).clone().requires_grad_()
    y1, bias1 = fc1(x1, M_SPLITS)
    y2, bias2 = fc2(x2, M_SPLITS)
    loss = (y1 * shard_tensor(t["g1"], 1, rank, world, gated=True)).sum() + (y2 * t["g2"]).sum()
    loss.backward()
    out.update(y1=y1.detach(), dx1=x1.grad, dA1=fc1.lora_A.grad, dB1=fc1.lora_B.grad,
               y2=y2.detach(), dx2=x2.grad, dA2=fc2.lora_A.grad, dB2=fc2.lora_B.grad,
               biases=(bias1, bias2))
    out["flags"] = {f"{n}.{f}": (getattr(getattr(layer, f), "sequence_parallel", False),
                                 getattr(getattr(layer, f), "allreduce", None),
                                 getattr(getattr(layer, f), "tensor_model_parallel", False))
                    for n, layer in (("fc1", fc1), ("fc2", fc2)) for f in ("lora_A", "lora_B")}
    # The branch: two batched GEMMs forward, whatever the number of experts; none per expert.
    xb = t["x1"].clone().requires_grad_()
    a, b = fc1.lora_A.detach().clone().requires_grad_(), fc1.lora_B.detach().clone().requires_grad_()
    branch, out["forward_gemms"] = _count_matmuls(lambda: grouped_lora_branch(xb, M_SPLITS, a, b, 2.0))
    _, out["backward_gemms"] = _count_matmuls(lambda: branch.sum().backward())
    out["refusals"] = _refusals(lora_config, sp)
    return out


def _refusals(lora_config, sp):
    """The messages of what the grouped layers refuse: dropout, DoRA, and at expert-TP > 1 a
    replicated factor's gradient nobody would sum (no SP)."""
    import dataclasses

    found = {}
    for name, cfg, layer_sp in (("dropout", dataclasses.replace(lora_config, dropout=0.1), sp),
                                ("dora", dataclasses.replace(lora_config, use_dora=True), sp),
                                ("no_sp", lora_config, False)):
        if name == "no_sp" and tp_rank()[0] == 1:
            continue
        try:
            _grouped_pair(cfg, layer_sp)
        except ValueError as err:
            found[name] = str(err)
    return found


def reference(t, scaling):
    """Plain per-expert torch, unsharded: ``y_e = x_e W_e^T + s (x_e A_e^T) B_e^T`` on each
    expert's rows, and every gradient of ``sum(y1 g1) + sum(y2 g2)``."""
    out = {}
    for layer, x, w, b, g in (("1", t["x1"], t["w1"], t["b1"], t["g1"]), ("2", t["x2"], t["w2"], t["b2"], t["g2"])):
        x = x.clone().requires_grad_()
        a = t[f"a{layer}"].clone().requires_grad_()
        b = b.clone().requires_grad_()
        ys = [xe @ w[e].T + scaling * (xe @ a[e].T) @ b[e].T for e, xe in enumerate(torch.split(x, M_SPLITS))]
        y = torch.cat(ys)
        (y * g).sum().backward()
        out.update({f"y{layer}": y.detach(), f"dx{layer}": x.grad, f"dA{layer}": a.grad, f"dB{layer}": b.grad})
    return out


def logical_a(lora_config):
    """The logical per-expert A's of fc1 / fc2 (the SequentialMLP experts' init)."""
    from megatron_lora.core.init import logical_lora_a

    c = lora_config
    return {f"a{i}": torch.stack([logical_lora_a((c.rank, fan_in), c.init, c.seed,
                                                 f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc{i}", c.rank)
                                  for j in range(EXPERTS)]) for i, fan_in in (("1", HIDDEN), ("2", FFN))}


# --------------------------------------------------------------------------------- model level

MOE = dict(num_moe_experts=EXPERTS, moe_router_topk=2, moe_token_dispatcher_type="alltoall")
TE = "transformer_engine"


def _grouped_state(full_state, model):
    """``full_state`` (SequentialMLP names, global expert indices) with each grouped expert
    weight added under its TEGroupedMLP name: ``...experts.linear_fc1.weight{local j}``."""
    from megatron.core import parallel_state as ps

    local = EXPERTS // ps.get_expert_model_parallel_world_size()
    first = ps.get_expert_model_parallel_rank() * local
    out = dict(full_state)
    for key in full_state:
        head, sep, tail = key.partition(".mlp.experts.local_experts.")
        if sep:
            index, leaf = tail.split(".", 1)  # "3", "linear_fc1.weight"
            if first <= int(index) < first + local:
                out[f"{head}.mlp.experts.{leaf}{int(index) - first}"] = full_state[key]
    return out


def _models(full_state, ep, grouped_path):
    """(SequentialMLP on the local spec, TEGroupedMLP on the TE spec), same base, LoRA applied.
    ``grouped_path``: "apply" (Megatron's TE spec, converted by apply_lora) or "spec" (the LoRA spec)."""
    from megatron_lora import apply_lora, get_gpt_lora_layer_spec
    from tests.distributed import gpt_cases as G
    from tests.distributed.models import build_tiny_gpt, tiny_gpt_config

    moe = dict(MOE, expert_model_parallel_size=ep)
    sequential = G.build_lora_gpt(full_state, path="apply", config_overrides=moe)
    config = tiny_gpt_config(**{**G.MODEL, **moe, "moe_grouped_gemm": True})
    spec = None
    if grouped_path == "spec":
        spec = get_gpt_lora_layer_spec(G.lora_cfg(), transformer_impl=TE, num_experts=EXPERTS, moe_grouped_gemm=True)
    grouped = build_tiny_gpt(config, layer_spec=spec, transformer_impl=TE)
    G.load_base(grouped, _grouped_state(full_state, grouped))
    return sequential, apply_lora(grouped, G.lora_cfg())


def _adapter_grads(model):
    """{adapter tensor name: its gradient} of this rank, per expert for grouped layers."""
    from megatron_lora.core.checkpoint.adapter import _named_factors

    out = {}
    for name, (m, f) in _named_factors(model).items():
        layer = getattr(m, "layer", None)
        grad = getattr(m, f).grad if layer is None else getattr(layer, f).grad[m.local_index]
        out[name] = grad.detach().clone()
    return out


def model_worker(full_state, ep, grouped_path, root):
    """Largest differences between the SequentialMLP and the grouped model: adapters after init,
    logits and adapter gradients after a hand-over in each direction (full adapter), logits
    after a dist-checkpoint hand-over, merge / unmerge on the grouped model."""
    import os

    from megatron_lora import lora_modules, merge_lora, unmerge_lora
    from megatron_lora.core.checkpoint.adapter import gather_full_adapter, load_adapter, load_full_adapter, save_adapter
    from tests.distributed import gpt_cases as G

    sequential, grouped = _models(full_state, ep, grouped_path)
    inputs, labels = G.batches(1)[0]
    gap = lambda a, b: max((a[k] - b[k]).abs().max().item() for k in a) if a.keys() == b.keys() else float("inf")  # noqa: E731
    logits_gap = lambda: (G.logits(sequential, inputs) - G.logits(grouped, inputs)).abs().max().item()  # noqa: E731
    out = dict(classes=sorted({type(m).__name__ for m in lora_modules(grouped)}))
    out["init"] = gap(gather_full_adapter(sequential), gather_full_adapter(grouped))
    out["names"] = sorted(gather_full_adapter(grouped)) == sorted(gather_full_adapter(sequential))
    G.plain_train(sequential, 2)
    load_full_adapter(grouped, gather_full_adapter(sequential))
    out["sequential_to_grouped"] = logits_gap()
    experts = [m for m in lora_modules(grouped) if hasattr(m, "expert_adapters")]
    for m in experts:  # the comparison sees the grouped branch: without it the logits differ
        m.lora_enabled = False
    out["grouped_branch_off"] = logits_gap()
    for m in experts:
        m.lora_enabled = True
    for model in (sequential, grouped):
        for p in model.parameters():
            p.grad = None
        G._loss(model, inputs, labels).backward()
    grads = _adapter_grads(sequential), _adapter_grads(grouped)
    out["grads"] = gap(*grads)
    out["grad_scale"] = min(g.abs().max().item() for k, g in grads[1].items() if ".experts." in k)
    G.plain_train(grouped, 2, first_step=2)
    load_full_adapter(sequential, gather_full_adapter(grouped))
    out["grouped_to_sequential"] = logits_gap()
    before = G.logits(grouped, inputs)
    merge_lora(grouped)
    out["merged"] = (G.logits(grouped, inputs) - before).abs().max().item()
    unmerge_lora(grouped)
    out["unmerged"] = (G.logits(grouped, inputs) - before).abs().max().item()
    # Dist checkpoints: the grouped adapter into the SequentialMLP model.
    G.plain_train(grouped, 1, first_step=4)
    save_adapter(grouped, os.path.join(root, "grouped"))
    load_adapter(sequential, os.path.join(root, "grouped"))
    out["dist_grouped_to_sequential"] = logits_gap()
    return out


def optimizer_state_worker(full_state, root):
    """save_adapter / load_adapter with Megatron's optimizer on a grouped model: the refusal's
    message (each call), then the adapter alone saves and loads."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_lora.core.checkpoint.adapter import load_adapter, save_adapter
    from megatron_lora.core.checkpoint.errors import CheckpointError

    _, grouped = _models(full_state, 1, "apply")
    ddp = DistributedDataParallel(grouped.config, DistributedDataParallelConfig(), module=grouped)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0), [ddp])
    messages = []
    for call in (lambda: save_adapter(grouped, root, 1, optimizer=opt),
                 lambda: load_adapter(grouped, root, optimizer=opt)):
        try:
            call()
        except CheckpointError as err:
            messages.append(str(err))
    save_adapter(grouped, root, 1)
    load_adapter(grouped, root)
    return messages
