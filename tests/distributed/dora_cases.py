"""Workers of test_dora.py: DoRA layers from logical tensors, and the plain-torch DoRA reference.

The layer workers reuse ``layer_cases`` (build, load, feed, reassemble) and add DoRA's magnitude:
loaded from a logical ``[out]`` tensor by the layout (column: sharded like the output rows; row:
replicated), its gradient reassembled the same way (SP: summed over the ranks' sequence chunks).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from tests.distributed import gpt_cases as G
from tests.distributed import layer_cases as L
from tests.distributed.models import tp_rank
from tests.distributed.shapes import EPS, H_IN, H_OUT

MAGNITUDE = "lora_magnitude"


def logical_tensors(seed: int = 0, norm: bool = False) -> dict:
    """``layer_cases.logical_tensors`` with a magnitude that is NOT ‖W‖ (so that ``m / n`` matters)."""
    t = L.logical_tensors(seed, norm)
    g = torch.Generator().manual_seed(seed + 1)
    return dict(t, lora_magnitude=t["weight"].norm(dim=1) * (1 + torch.rand(H_OUT, generator=g)))


def reference(case: L.Case, t: dict, scaling: float, mask: Optional[torch.Tensor] = None,
              fused_norm: bool = False) -> dict:
    """Unsharded plain torch, the DoRA paper's / PEFT's formula:
    ``y = m / ‖W + s B A‖ * (N W^T + s (drop(N) A^T) B^T) + b``, the norm per output row, detached."""
    x = t["x"].clone().requires_grad_(True)
    a = t["lora_A"].clone().requires_grad_(True)
    b = t["lora_B"].clone().requires_grad_(True)
    m = t[MAGNITUDE].clone().requires_grad_(True)
    n = torch.nn.functional.rms_norm(x, (H_IN,), t["norm"], EPS) if fused_norm else x
    nd = n if mask is None else n * mask / (1 - case.dropout)
    weight_norm = torch.linalg.norm(t["weight"] + scaling * (b @ a), dim=1).detach()
    y = (m / weight_norm) * (n @ t["weight"].t() + scaling * (nd @ a.t()) @ b.t())
    if case.bias and not case.skip_bias_add:
        y = y + t["bias"]
    (y * t["dy"]).sum().backward()
    return dict(y=y.detach(), dx=x.grad, dA=a.grad, dB=b.grad, dm=m.grad)


def load_magnitude(layer, t: dict) -> None:
    tp, rank = tp_rank()
    with torch.no_grad():
        layer.lora_magnitude.copy_(layer.lora_layout.shard(MAGNITUDE, t[MAGNITUDE], rank, tp))


def run_case(case: L.Case, t: dict, lora_config, seed: int = 7) -> dict:
    """``layer_cases.run_case`` for a DoRA layer; also the magnitude's gradient and its init from
    the loaded base."""
    from megatron_lora.core import dora

    tp, _ = tp_rank()
    layer = L.build_layer(case, tp, dataclasses.replace(lora_config, dropout=case.dropout))
    L.load_shards(layer, t)
    dora.init_magnitude(layer, "decoder.layers.0.test")
    init = layer.lora_magnitude.detach().clone()
    load_magnitude(layer, t)
    x, dy = L.local_input_and_grad(case, t)
    torch.manual_seed(seed)
    y, out_bias = layer(x)
    y.backward(dy)
    return dict(y=y.detach(), bias_out=None if out_bias is None else out_bias.detach(), dx=x.grad,
                dA=layer.lora_A.grad, dB=layer.lora_B.grad, dm=layer.lora_magnitude.grad,
                weight_grad=layer.weight.grad, init=init)


def assemble(case: L.Case, per_rank: list) -> dict:
    """``layer_cases.assemble`` plus the magnitude's gradient (and init) by its layout."""
    out = L.assemble(case, per_rank)
    pick = lambda k: [r[k] for r in per_rank]  # noqa: E731
    sp = case.sp and len(per_rank) > 1 and not case.expert
    if case.kind == "column":
        out["dm"], out["init"] = torch.cat(pick("dm")), torch.cat(pick("init"))
    else:
        out["dm"] = sum(pick("dm")) if sp else pick("dm")[0]
        out["init"] = pick("init")[0]
    return out


def worker_cases(cases, t, lora_config, counted=False) -> list:
    """Every case in one process group; with ``counted`` each case's collectives too: the DoRA
    layer's, a LoRA layer's and, on the same layer with the adapter off, the frozen base's."""
    from tests.collective_count import count_collectives

    out = []
    for case in cases:
        result = run_case(case, t, lora_config)
        if counted:
            result["calls"] = {}
            lora = dataclasses.replace(lora_config, use_dora=False)
            for variant, cfg, enabled in (("dora", lora_config, True), ("lora", lora, True), ("base", lora_config, False)):
                layer = L.build_layer(case, tp_rank()[0], cfg)
                L.load_shards(layer, t)
                layer.lora_enabled = enabled
                x, dy = L.local_input_and_grad(case, t)
                with count_collectives() as fwd:
                    y, _ = layer(x)
                with count_collectives() as bwd:
                    y.backward(dy)
                result["calls"][variant] = (fwd.calls, bwd.calls)
        out.append(result)
    return out


# ------------------------------------------------------------------------------------ the model

def dora_cfg(**overrides):
    """``gpt_cases.lora_cfg`` with DoRA."""
    return dataclasses.replace(G.lora_cfg(), use_dora=True, **overrides)


def pp_train_worker(full_state, cfg, steps):
    """AdamW on the adapter through Megatron's pipeline schedule (one micro-batch: the whole batch,
    as ``gpt_cases.plain_train``); the last stage's losses and the local adapter."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_lora import lora_parameters

    model = G.build_lora_gpt(full_state, cfg=cfg)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2, weight_decay=0.01)

    def step(data_iterator, m):
        inputs, labels = next(data_iterator)
        out = m(inputs if ps.is_pipeline_first_stage() else None, G.positions(inputs), None, labels=labels)
        return out, lambda loss: (loss.float().mean(), {"loss": loss.float().mean().detach()})

    losses = []
    for inputs, labels in G.batches(steps):
        opt.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([(inputs, labels)]), model=[model], num_microbatches=1,
            seq_length=inputs.shape[1], micro_batch_size=inputs.shape[0])
        opt.step()
        if ps.is_pipeline_last_stage():
            losses.append(out[0]["loss"].item())
    return dict(losses=losses, adapter=G.local_adapter(model))


def _ordered_calls(model, inputs, labels) -> list:
    """(collective, payload bytes) of one forward + backward, in call order."""
    from tests.collective_count import count_collectives

    seq = []
    with count_collectives() as log:
        record = log.record

        def ordered(name, tensor):
            seq.append((name, tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0))
            record(name, tensor)

        log.record = ordered
        G._loss(model, inputs, labels).backward()
    return seq


def collectives_worker(full_state):
    """At this group's TP, with and without SP: the collectives of one forward + backward of the
    DoRA model, of the same model with its adapters off (the frozen base), of a LoRA model, and of
    the DoRA model with its norm on its own all-reduce (``breakages.dora_norm_own_all_reduce``)."""
    from megatron_lora import adapters_disabled
    from tests.distributed import breakages

    inputs, labels = G.batches(1)[0]
    out = {}
    for sp in (False, True):
        runs = {}
        for name, cfg in (("dora", dora_cfg()), ("lora", G.lora_cfg())):
            model = G.build_lora_gpt(full_state, sp=sp, cfg=cfg)
            # the frozen base then runs its whole backward (every layer's dX), as the adapted model does
            model.embedding.register_forward_hook(lambda _m, _i, output: output.requires_grad_(True))
            runs[name] = _ordered_calls(model, inputs, labels)
            if name == "dora":
                with adapters_disabled(model):
                    runs["base"] = _ordered_calls(model, inputs, labels)
                with breakages.dora_norm_own_all_reduce():
                    runs["broken"] = _ordered_calls(model, inputs, labels)
        out[sp] = runs
    return out


# ------------------------------------------------------------------------------------ checkpoints

def _outputs(model) -> dict:
    """Logits of one fixed batch, gathered over TP, and the adapter gathered in its logical form."""
    from megatron.core import parallel_state as ps

    from megatron_lora.core import collectives as C
    from megatron_lora.core.checkpoint.adapter import gather_full_adapter

    inputs = G.batches(1)[0][0]
    logits = C.all_gather_list(G.logits(model, inputs).contiguous(), ps.get_tensor_model_parallel_group())
    return dict(logits=torch.cat(logits, -1), adapter=gather_full_adapter(model))


def save_worker(full_state, root, steps):
    """Train DoRA ``steps`` steps, save the adapter (dist checkpoint and full file); its outputs."""
    import os

    from megatron_lora.core.checkpoint.adapter import save_adapter, save_full_adapter

    model = G.build_lora_gpt(full_state, cfg=dora_cfg())
    G.plain_train(model, steps)
    save_adapter(model, os.path.join(root, "dist"), iteration=steps)
    save_full_adapter(model, os.path.join(root, "full.safetensors"))
    out = _outputs(model)
    out["merge"] = _merge_round_trip(model)
    return out


def _merge_round_trip(model) -> dict:
    """merge_lora -> the plain base forward's logits against the DoRA forward's; unmerge_lora -> the
    base weights' bits back."""
    from megatron_lora import lora_modules, merge_lora, unmerge_lora

    inputs = G.batches(1)[0][0]
    weights = {id(m): m.weight.detach().clone() for m in lora_modules(model)}
    before = G.logits(model, inputs)
    merge_lora(model)
    merged = G.logits(model, inputs)
    changed = all(not torch.equal(m.weight, weights[id(m)]) for m in lora_modules(model))
    unmerge_lora(model)
    return dict(merged_gap=(merged - before).abs().max().item(), scale=before.abs().max().item(), changed=changed,
                restored=all(torch.equal(m.weight, weights[id(m)]) for m in lora_modules(model)),
                after_gap=(G.logits(model, inputs) - before).abs().max().item())


def load_worker(full_state, root, how):
    """A fresh DoRA model with the saved adapter loaded (``how``: "dist" or "full"); its outputs."""
    import os

    from megatron_lora.core.checkpoint.adapter import load_adapter, load_full_adapter

    model = G.build_lora_gpt(full_state, cfg=dora_cfg())
    if how == "dist":
        load_adapter(model, os.path.join(root, "dist"))
    else:
        load_full_adapter(model, os.path.join(root, "full.safetensors"))
    return _outputs(model)


def config_mismatch_worker(full_state, root):
    """The errors of loading across ``use_dora``, and an old descriptor (no ``use_dora``) loading as
    a LoRA adapter: {case: the error's message, or None when it loaded}."""
    import json
    import os

    from megatron_lora.core.checkpoint.adapter import load_adapter, load_full_adapter, save_adapter
    from megatron_lora.core.checkpoint.errors import CheckpointError
    from megatron_lora.core.checkpoint.files import DESCRIPTOR_FILE

    lora_root = os.path.join(root, "lora")
    save_adapter(G.build_lora_gpt(full_state), lora_root, iteration=1)
    descriptor = os.path.join(lora_root, "iter_0000001", DESCRIPTOR_FILE)
    with open(descriptor) as f:
        saved = json.load(f)
    del saved["lora_config"]["use_dora"]  # as written before the field existed
    with open(descriptor, "w") as f:
        json.dump(saved, f)

    def attempt(load):
        try:
            load()
        except CheckpointError as err:
            return str(err)
        return None

    return dict(
        old_into_lora=attempt(lambda: load_adapter(G.build_lora_gpt(full_state), lora_root)),
        old_into_dora=attempt(lambda: load_adapter(G.build_lora_gpt(full_state, cfg=dora_cfg()), lora_root)),
        dora_into_lora=attempt(lambda: load_adapter(G.build_lora_gpt(full_state), os.path.join(root, "dist"))),
        dora_file_into_lora=attempt(lambda: load_full_adapter(G.build_lora_gpt(full_state),
                                                              os.path.join(root, "full.safetensors"))))


# ------------------------------------------------------------------------ other layer families

def external_worker(kind, fused_norm, sp, t, lora_config):
    """``run_case`` on the external-GEMM layer (the Transformer Engine layers' code around a torch
    GEMM, ``external_cases.TorchLocalGEMM``); its collective calls and the frozen base's."""
    from megatron_lora.core import dora
    from tests.distributed import external_cases as E

    def built(enabled=True):
        layer = E.build(kind, fused_norm, sp, lora_config)
        L.load_shards(layer, t)
        layer.lora_enabled = enabled
        return layer

    layer = built()
    dora.init_magnitude(layer, "decoder.layers.0.test")
    init = layer.lora_magnitude.detach().clone()
    load_magnitude(layer, t)
    x, dy = L.local_input_and_grad(L.Case(kind, sp=sp), t)
    y, counts = E.forward_backward(layer, x, dy)
    base_x, base_dy = L.local_input_and_grad(L.Case(kind, sp=sp), t)
    _, base_counts = E.forward_backward(built(enabled=False), base_x, base_dy)
    return dict(y=y, dx=x.grad, dA=layer.lora_A.grad, dB=layer.lora_B.grad, dm=layer.lora_magnitude.grad,
                weight_grad=layer.weight.grad, init=init, counts=counts, base_counts=base_counts)


def refusal_worker():
    """At TP=2: the messages of what DoRA refuses (a row expert layer, whose reduction the token
    dispatcher runs, under "rider_only" and "partial"; the MoE router), None where nothing was raised."""
    from megatron_lora import apply_lora
    from tests.distributed.models import build_tiny_gpt
    from tests.distributed.moe_cases import moe_config

    def message(build):
        try:
            build()
        except ValueError as err:
            return str(err)
        return None

    def moe_model(target):  # expert-TP = TP = 2, SP
        return apply_lora(build_tiny_gpt(moe_config(sp=True)), dora_cfg(target_modules=(target,)))

    return {"row expert": message(lambda: L.build_layer(L.Case("row", expert=True), 2, dora_cfg())),
            "row expert sp": message(lambda: L.build_layer(L.Case("row", sp=True, expert=True), 2, dora_cfg())),
            "moe expert fc2": message(lambda: moe_model("experts.linear_fc2")),
            "router": message(lambda: moe_model("router"))}


def bf16_worker(cases, t, lora_config) -> list:
    """``run_case`` with bf16 parameters, input and dY (outputs and gradients back in fp32)."""
    from megatron.core import ModelParallelConfig

    from megatron_lora import LoRAColumnParallelLinear, LoRARowParallelLinear

    tp, _ = tp_rank()
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in t.items()}
    out = []
    for case in cases:
        cfg = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=case.sp, use_cpu_initialization=True,
                                  perform_initialization=False, params_dtype=torch.bfloat16)
        common = dict(config=cfg, init_method=torch.nn.init.zeros_, bias=case.bias, skip_bias_add=False,
                      lora_config=lora_config, lora_init_name="decoder.layers.0.test")
        layer = (LoRAColumnParallelLinear(H_IN, H_OUT, gather_output=False, **common) if case.kind == "column"
                 else LoRARowParallelLinear(H_IN, H_OUT, input_is_parallel=True, **common))
        L.load_shards(layer, bf16)
        load_magnitude(layer, bf16)
        x, dy = L.local_input_and_grad(case, bf16)
        y, _ = layer(x)
        y.backward(dy)
        out.append({k: v.float() for k, v in dict(y=y.detach(), dx=x.grad, dA=layer.lora_A.grad, dB=layer.lora_B.grad,
                                                   dm=layer.lora_magnitude.grad, init=layer.lora_magnitude.detach()).items()})
    return out
