"""Worker code for the TE-path operators (``external_gemm``) driven by a plain-torch local GEMM.

``TorchLocalGEMM`` honours the contract a communication-free TE module gives the TE LoRA layers
(``te_layers._TELoRA._local_gemm``): RMS norm first when fused (its output returned), the GEMM of
this rank's shard, no TP communication, a returned bias not yet added. The TE layers and these
test layers share every line of LoRA and collective code; only ``_local_gemm`` differs.
"""

from __future__ import annotations

import torch

from megatron_lora.core import collectives as C
from megatron_lora.core.external_gemm import ExternalGEMMLoRA

S, B, H_IN, H_OUT, RANK, EPS = 8, 2, 16, 24, 4, 1e-5


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


def logical_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(x=r(S, B, H_IN), dy=r(S, B, H_OUT), weight=r(H_OUT, H_IN) / 4, bias=r(H_OUT),
                norm=1 + r(H_IN) / 4, lora_A=r(RANK, H_IN) / 4, lora_B=r(H_OUT, RANK) / 4)


def reference(kind, fused_norm, t, scaling):
    """Unsharded plain torch: ``Y = N(X) W^T + b + s (N(X) A^T) B^T`` (N = RMS norm or identity)."""
    x = t["x"].clone().requires_grad_(True)
    a = t["lora_A"].clone().requires_grad_(True)
    b = t["lora_B"].clone().requires_grad_(True)
    n = torch.nn.functional.rms_norm(x, (H_IN,), t["norm"], EPS) if fused_norm else x
    y = n @ t["weight"].t() + scaling * (n @ a.t()) @ b.t() + t["bias"]
    (y * t["dy"]).sum().backward()
    return dict(y=y.detach(), dx=x.grad, dA=a.grad, dB=b.grad)


def build(kind, fused_norm, sp, lora_config, fuse=False, bias=True):
    from megatron.core import ModelParallelConfig, parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp and tp > 1,
                              use_cpu_initialization=True, gradient_accumulation_fusion=fuse)
    return TorchLocalGEMM(kind, fused_norm, cfg, parallel_state.get_tensor_model_parallel_group(),
                          bias=bias, skip_bias_add=False, lora_config=lora_config)


def load_base_shards(layer, column: bool, t):
    """This rank's shards of the base tensors of ``t`` into any parallel linear; frozen."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        layer.weight.copy_(t["weight"].chunk(tp, 0 if column else 1)[rank])
        layer.bias.copy_(t["bias"].chunk(tp, 0)[rank] if column else t["bias"])
        if hasattr(layer, "layer_norm_weight"):
            layer.layer_norm_weight.copy_(t["norm"])
    for name in ("weight", "bias", "layer_norm_weight"):
        if hasattr(layer, name):
            getattr(layer, name).requires_grad_(False)


def load_shards(layer, t):
    """This rank's shards of ``t`` into any LoRA layer (local or external); the base frozen."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    load_base_shards(layer, layer.lora_layout.a_dim is None, t)  # column layers replicate A
    with torch.no_grad():
        for f in ("lora_A", "lora_B"):
            getattr(layer, f).copy_(layer.lora_layout.shard(f, t[f], rank, tp))


def local_input_and_grad(kind, sp, t):
    """This rank's X and dY (sequence chunk under SP, hidden shard for a row input)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    x, dy = t["x"], t["dy"]
    if kind == "column":
        if sp and tp > 1:
            x = x.chunk(tp, 0)[rank]
        dy = dy.chunk(tp, -1)[rank]
    else:
        x = x.chunk(tp, -1)[rank]
        if sp and tp > 1:
            dy = dy.chunk(tp, 0)[rank]
    return x.clone().requires_grad_(True), dy


def worker(kind, fused_norm, sp, t, lora_config, seed=7, count=False, active=True, layer=None):
    """Forward + backward on this rank's shard; the outputs, grads and collective counts.

    ``layer``: an already built LoRA layer (e.g. a TE one); else the plain-torch stand-in.
    """
    layer = layer if layer is not None else build(kind, fused_norm, sp, lora_config)
    load_shards(layer, t)
    layer.lora_enabled = active
    x, dy = local_input_and_grad(kind, sp, t)
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
    with C.count_collectives() as forward:
        y, bias = layer(x)
        if bias is not None:
            y = y + bias
    with C.count_collectives() as backward:
        y.backward(dy)
    return y.detach(), (forward.total_calls, backward.total_calls)


def fused_main_grad_worker(kind, fused_norm, sp, t, lora_config, external):
    """Two micro-batches with DDP-style ``main_grad`` buffers, fusion on and off; both results."""
    from tests.distributed import layer_cases

    def one(fuse):
        if external:
            layer = build(kind, fused_norm, sp, lora_config, fuse=fuse)
            load_shards(layer, t)
        else:
            case = layer_cases.Case(kind, sp=sp)
            layer = layer_cases.build_layer(case, _tp(), lora_config)
            layer.config.gradient_accumulation_fusion = fuse
            load_shards(layer, t)
        params = (layer.lora_A, layer.lora_B)
        for p in params:  # what Megatron's DDP sets up
            p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
            p.grad_added_to_main_grad = False
        for micro in range(2):
            x, dy = local_input_and_grad(kind, sp, {**t, "x": t["x"] * (1 + micro)})
            y, _ = layer(x)
            y.backward(dy)
            for p in params:  # DDP's hook, verbatim in effect
                if p.grad is not None and not p.grad_added_to_main_grad:
                    p.main_grad.add_(p.grad)
                p.grad = None
        return [p.main_grad.clone() for p in params], [p.grad_added_to_main_grad for p in params]

    return one(False), one(True)


def _tp():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def gather(kind, sp, per_rank, name):
    """The logical tensor from the ranks' locals (SP partials of a replicated factor summed)."""
    from megatron_lora.core.layout import AdapterLayout

    tp = len(per_rank)
    parts = [r[name] for r in per_rank]
    if name == "y":
        return torch.cat(parts, -1) if kind == "column" else (torch.cat(parts, 0) if sp and tp > 1 else parts[0])
    if name == "dx":
        return torch.cat(parts, 0) if kind == "column" and sp and tp > 1 else (
            torch.cat(parts, -1) if kind == "row" else parts[0])
    layout = AdapterLayout.column() if kind == "column" else AdapterLayout.row()
    factor = {"dA": "lora_A", "dB": "lora_B"}[name]
    if layout.partition_dim(factor) is None:
        return sum(parts) if sp and tp > 1 else parts[0]
    return layout.unshard(factor, parts)
