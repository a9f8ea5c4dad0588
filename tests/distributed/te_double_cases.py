"""Workers of test_te_double.py; they run in ranks started with ``te_double=True``."""

from __future__ import annotations

import torch

from tests.distributed import gpt_cases as G
from tests.distributed.shapes import EPS, H_IN, H_OUT

TE = "transformer_engine"


def _grad_probe(module, inputs, output):
    """The embedding output as a leaf that wants a gradient: backward runs through every layer
    although every base weight is frozen (LoRA's setting), and no embedding backward is added."""
    return output.detach().requires_grad_()


def collective_counts_worker(base_state, sp):
    """Calls per collective in one forward and one backward: frozen base TE model (TE's own
    communication) vs the LoRA TE model (ours), gradients flowing through every layer in both."""
    from tests.collective_count import count_collectives
    from tests.distributed.models import build_tiny_gpt, tiny_gpt_config, tp_rank

    config = tiny_gpt_config(tp=tp_rank()[0], sp=sp, **G.MODEL)
    base = build_tiny_gpt(config, transformer_impl=TE)  # Megatron's TE spec: TE's own communication
    G.load_base(base, base_state)
    base.requires_grad_(False)
    lora = G.build_lora_gpt(base_state, sp=sp, path="spec", transformer_impl=TE)
    inputs, labels = G.batches(1)[0]
    counts = {}
    for name, model in (("base", base), ("lora", lora)):
        model.embedding.register_forward_hook(_grad_probe)
        with count_collectives() as forward:
            loss = G._loss(model, inputs, labels)
        with count_collectives() as backward:
            loss.backward()
        counts[name] = (forward.calls, backward.calls)
    return counts


def exchange_worker(base_state, root):
    """Base and adapters moving between the local and the TE spec through dist checkpoints (and
    the full adapter), then merge on TE: the largest logits differences of each hand-over."""
    import os

    from megatron_lora import lora_modules, merge_lora, unmerge_lora
    from megatron_lora.core.checkpoint.adapter import gather_full_adapter, load_adapter, load_full_adapter, save_adapter
    from megatron_lora.training.model_checkpoint import load_model, save_model

    inputs = G.batches(1)[0][0]
    gap = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    diff = lambda a, b: gap(G.logits(a, inputs), G.logits(b, inputs))  # noqa: E731
    save_model(G.build_lora_gpt(base_state, path="spec"), os.path.join(root, "base"), 1, {})

    def from_checkpoint(impl):  # the base from the local-spec checkpoint only
        model = G.build_lora_gpt(base_state, path="spec", transformer_impl=impl, load=False)
        load_model(model, os.path.join(root, "base"))
        return model

    te = from_checkpoint(TE)
    G.plain_train(te, 3)
    save_adapter(te, os.path.join(root, "te_adapter"))
    local = from_checkpoint("local")
    load_adapter(local, os.path.join(root, "te_adapter"))
    out = dict(te_to_local=diff(local, te))
    G.plain_train(local, 3, first_step=3)
    te = from_checkpoint(TE)
    load_full_adapter(te, gather_full_adapter(local))
    out["local_to_te"] = diff(te, local)
    before = G.logits(te, inputs)
    merge_lora(te)
    out["merged"] = gap(G.logits(te, inputs), before)
    unmerge_lora(te)
    out["unmerged"] = gap(G.logits(te, inputs), before)
    lora_keys = lambda m: sorted(k for k in m.sharded_state_dict() if "lora" in k)  # noqa: E731
    out["names_equal"] = lora_keys(te) == lora_keys(local) and len(lora_keys(te)) == G.ADAPTER_TENSORS
    out["te_classes"] = sorted({type(m).__name__ for m in lora_modules(te)})
    return out


# ------------------------------------------------------------------ single TE layers, vs reference

TE_LAYERS = [("column", True), ("column", False), ("row", False)]  # (kind, fused norm)


def _te_layer(kind, fused_norm, sp, skip_bias_add, lora_config=None):
    """A TE LoRA layer (or, without ``lora_config``, Megatron's plain TE layer) of the
    external-GEMM test shapes, as Megatron's TE spec would build it."""
    from megatron.core.extensions import transformer_engine as mte
    from megatron.core.transformer import TransformerConfig

    from megatron_lora.core import te_layers
    from tests.distributed.models import tp_rank

    tp, _ = tp_rank()
    config = TransformerConfig(num_layers=1, hidden_size=H_IN, num_attention_heads=4,
                               normalization="RMSNorm", layernorm_epsilon=EPS,
                               tensor_model_parallel_size=tp, sequence_parallel=sp and tp > 1)
    kwargs = dict(config=config, init_method=torch.nn.init.zeros_, bias=True,
                  skip_bias_add=skip_bias_add, is_expert=False)
    if kind == "column":
        classes = ((mte.TELayerNormColumnParallelLinear, te_layers.LoRATELayerNormColumnParallelLinear)
                   if fused_norm else (mte.TEColumnParallelLinear, te_layers.LoRATEColumnParallelLinear))
        kwargs.update(gather_output=False, tp_comm_buffer_name="qkv")
    else:
        classes = (mte.TERowParallelLinear, te_layers.LoRATERowParallelLinear)
        kwargs.update(input_is_parallel=True, tp_comm_buffer_name="proj")
    if lora_config is None:
        return classes[0](H_IN, H_OUT, **kwargs)
    return classes[1](H_IN, H_OUT, lora_config=lora_config, lora_init_name="decoder.layers.0.test",
                      **kwargs)


def te_layers_worker(sp, t, lora_config):
    """Every TE LoRA class, with skip_bias_add off and on: external_cases.worker's results, and
    the collective calls of the plain TE layer (TE's own communication) on the same input."""
    from tests.distributed import external_cases as E
    from tests.distributed import layer_cases as L

    results = {}
    for kind, fused_norm in TE_LAYERS:
        for skip in (False, True):
            layer = _te_layer(kind, fused_norm, sp, skip, lora_config)
            result = E.worker(kind, fused_norm, sp, t, lora_config, count=True, layer=layer)
            base = _te_layer(kind, fused_norm, sp, skip)
            L.load_base_shards(base, kind == "column", t)
            _, result["base_counts"] = E.forward_backward(base, *L.local_input_and_grad(L.Case(kind, sp=sp), t))
            results[(kind, fused_norm, skip)] = result
    return results

