"""Worker code for the TE-path operators (``external_gemm``) driven by a plain-torch local GEMM.

``TorchLocalGEMM`` honours the contract a communication-free TE module gives the TE LoRA layers
(``te_layers._TELoRA._local_gemm``): RMS norm first when fused (its output returned), the GEMM of
this rank's shard, no TP communication, a returned bias not yet added. The TE layers and these
test layers share every line of LoRA and collective code; only ``_local_gemm`` differs.

The logical tensors (``logical_tensors(norm=True)``), the plain-torch reference, the loading of
shards and the reassembly are ``layer_cases``'s, for a ``Case(kind, sp=sp)``: a column layer
whose output is not gathered, a row layer whose input is parallel.
"""

from __future__ import annotations

import torch

from megatron_lora.core import collectives as C
from megatron_lora.core.external_gemm import ExternalGEMMLoRA
from tests.collective_count import count_collectives
from tests.distributed import layer_cases as L
from tests.distributed.models import tp_rank
from tests.distributed.shapes import EPS, H_IN, H_OUT


class TorchLocalGEMM(ExternalGEMMLoRA, torch.nn.Module):
    _base_tp_axes = None  # set per instance (column / row)

    def __init__(self, kind, fused_norm, config, group, bias, skip_bias_add, lora_config):
        torch.nn.Module.__init__(self)
        self.config = config
        self.lora_parallel_mode, self.lora_fused_norm = kind, fused_norm
        t = C.group_size(group)
        local_out, local_in = (H_OUT // t, H_IN) if kind == "column" else (H_OUT, H_IN // t)
        self.weight = torch.nn.Parameter(torch.zeros(local_out, local_in), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(local_out if kind == "column" else H_OUT),
                                       requires_grad=False) if bias else None
        if fused_norm:
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(H_IN), requires_grad=False)
        self._base_tp_axes = {"weight": 0, "bias": 0} if kind == "column" else {"weight": 1}
        self._init_external(H_IN, H_OUT, group, skip_bias_add)
        self._setup_lora(lora_config, False, "decoder.layers.0.test")

    def _local_gemm(self, x):
        norm_out = None
        if self.lora_fused_norm:
            x = norm_out = torch.nn.functional.rms_norm(x, (H_IN,), self.layer_norm_weight, EPS)
        out = torch.matmul(x, self.weight.t())
        return out, self.bias, norm_out


def build(kind, fused_norm, sp, lora_config, fuse=False, bias=True):
    from megatron.core import ModelParallelConfig, parallel_state

    tp, _ = tp_rank()
    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp and tp > 1,
                              use_cpu_initialization=True, gradient_accumulation_fusion=fuse)
    return TorchLocalGEMM(kind, fused_norm, cfg, parallel_state.get_tensor_model_parallel_group(),
                          bias=bias, skip_bias_add=False, lora_config=lora_config)


def worker(kind, fused_norm, sp, t, lora_config, seed=7, count=False, active=True, layer=None):
    """Forward + backward on this rank's shard; the outputs, grads and collective counts.

    ``layer``: an already built LoRA layer (e.g. a TE one); else the plain-torch stand-in.
    """
    layer = layer if layer is not None else build(kind, fused_norm, sp, lora_config)
    L.load_shards(layer, t)
    layer.lora_enabled = active
    x, dy = L.local_input_and_grad(L.Case(kind, sp=sp), t)
    torch.manual_seed(seed)  # the dropout mask comes from the TP-synchronised default generator
    y, counts = forward_backward(layer, x, dy)
    result = dict(y=y, dx=x.grad, dA=layer.lora_A.grad, dB=layer.lora_B.grad,
                  keys=sorted(k for k in layer.sharded_state_dict(prefix="layer.") if "lora" in k))
    if count:
        result["counts"] = counts
    return result


def forward_backward(layer, x, dy):
    """Forward (a returned bias added, as a skip_bias_add caller does) and backward of ``dy``;
    the output and the collective calls of each."""
    with count_collectives() as forward:
        y, bias = layer(x)
        if bias is not None:
            y = y + bias
    with count_collectives() as backward:
        y.backward(dy)
    return y.detach(), (forward.total_calls, backward.total_calls)


def fused_main_grad_worker(kind, fused_norm, sp, t, lora_config, external):
    """Two micro-batches with DDP-style ``main_grad`` buffers, fusion on and off; both results."""

    def one(fuse):
        if external:
            layer = build(kind, fused_norm, sp, lora_config, fuse=fuse)
        else:
            layer = L.build_layer(L.Case(kind, sp=sp), tp_rank()[0], lora_config)
            layer.config.gradient_accumulation_fusion = fuse
        L.load_shards(layer, t)
        params = (layer.lora_A, layer.lora_B)
        for p in params:  # what Megatron's DDP sets up
            p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
            p.grad_added_to_main_grad = False
        for micro in range(2):
            x, dy = L.local_input_and_grad(L.Case(kind, sp=sp), {**t, "x": t["x"] * (1 + micro)})
            y, _ = layer(x)
            y.backward(dy)
            for p in params:  # DDP's hook, verbatim in effect
                if p.grad is not None and not p.grad_added_to_main_grad:
                    p.main_grad.add_(p.grad)
                p.grad = None
        return [p.main_grad.clone() for p in params], [p.grad_added_to_main_grad for p in params]

    return one(False), one(True)
