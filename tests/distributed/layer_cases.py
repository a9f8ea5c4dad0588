"""Shared worker code for layer-level tests: build one LoRA layer from logical weights, run it.

Everything is derived from logical (unsharded) tensors made in the parent, so the parent can
compute an independent plain-torch reference and reassemble the ranks' shards by the docs/design.md §1
layout. Kept out of the test modules so the benchmark-free tests and the "harness must bite"
tests share one code path; the external-GEMM and TE layer tests (``external_cases``,
``te_double_cases``) load, feed and reassemble their layers with the same helpers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch

from megatron_lora.core.init import name_seed
from megatron_lora.core.layers import LORA_FACTORS
from tests.distributed.models import tp_rank
from tests.distributed.shapes import B, EPS, H_IN, H_OUT, RANK, S

OUTPUTS = ("y", "dx", "dA", "dB")  # what a reference and an assembled run hold


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "column" | "row"
    sp: bool = False
    gather_output: bool = False
    input_is_parallel: bool = True
    bias: bool = True
    skip_bias_add: bool = False
    dropout: float = 0.0
    # Explicit expert communication: the dispatcher reduces, not the layer. With ``sp`` the config
    # has SP (the layer still sees whole inputs) and the expert-TP group is the TP group, so the
    # layer issues nothing ("partial"); without, its rider gets its own all-reduce ("rider_only").
    expert: bool = False
    disable_grad_reduce: bool = False  # column only: the caller reduces dX

    @property
    def caller_reduces(self) -> bool:
        """The base layer issues no TP collective: its partial output / dX is summed outside."""
        return self.expert or self.disable_grad_reduce

    def __str__(self):
        flags = [k for k, v in dataclasses.asdict(self).items()
                 if v is True and not (k == "input_is_parallel" and self.kind == "column")]
        return f"{self.kind}[{','.join(flags)}{',p=%g' % self.dropout if self.dropout else ''}]"


def all_cases():
    cases = []
    for sp in (False, True):
        for bias in (False, True):
            for gather in (False, True):
                cases.append(Case("column", sp=sp, gather_output=gather, bias=bias))
            for parallel in (False, True):
                if sp and not parallel:
                    continue  # Megatron refuses SP without input_is_parallel
                cases.append(Case("row", sp=sp, input_is_parallel=parallel, bias=bias))
    cases.append(Case("column", bias=True, skip_bias_add=True))
    cases.append(Case("row", bias=True, skip_bias_add=True))
    cases.append(Case("column", bias=False, expert=True))
    cases.append(Case("row", bias=True, skip_bias_add=True, expert=True))
    cases.append(Case("column", sp=True, bias=False, expert=True))
    cases.append(Case("row", sp=True, bias=True, skip_bias_add=True, expert=True))
    cases.append(Case("column", bias=True, disable_grad_reduce=True))
    return cases


def logical_tensors(seed=0, norm=False):
    """X, dY, the base W and b and the factors A and B, unsharded (with ``norm``: the weight of a
    fused RMS norm too, drawn after b)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    t = dict(x=r(S, B, H_IN), dy=r(S, B, H_OUT), weight=r(H_OUT, H_IN) / 4, bias=r(H_OUT))
    if norm:
        t["norm"] = 1 + r(H_IN) / 4
    return dict(t, lora_A=r(RANK, H_IN) / 4, lora_B=r(H_OUT, RANK) / 4)


def reference(case: Case, t: dict, scaling: float, mask: Optional[torch.Tensor] = None,
              fused_norm: bool = False):
    """Unsharded plain-torch forward/backward: Y = N W^T + b + s (drop(N) A^T) B^T, where N is X
    or, with ``fused_norm``, the RMS norm of X."""
    x = t["x"].clone().requires_grad_(True)
    a = t["lora_A"].clone().requires_grad_(True)
    b = t["lora_B"].clone().requires_grad_(True)
    n = torch.nn.functional.rms_norm(x, (H_IN,), t["norm"], EPS) if fused_norm else x
    nd = n if mask is None else n * mask / (1 - case.dropout)
    y = n @ t["weight"].t() + scaling * (nd @ a.t()) @ b.t()
    if case.bias and not case.skip_bias_add:
        y = y + t["bias"]
    (y * t["dy"]).sum().backward()
    return dict(y=y.detach(), dx=x.grad, dA=a.grad, dB=b.grad)


def logical_mask(kind, p, seed):
    """The documented mask, rebuilt here from its definition (docs/design.md §6). Column: one
    ``torch.rand`` of the logical input. Row: one key drawn from the default generator, then eight
    column blocks, block j ``torch.rand`` of a generator seeded with ``name_seed(key, "block j")``."""
    torch.manual_seed(seed)  # the seed run_case uses right before the forward
    if kind == "column":
        return torch.rand(S, B, H_IN) >= p
    key = int(torch.randint(0, 2 ** 62, ()))
    blocks = [torch.rand(S, B, H_IN // 8, generator=torch.Generator().manual_seed(name_seed(key, f"block {j}")))
              for j in range(8)]
    return torch.cat(blocks, -1) >= p


def assert_matches(got: dict, ref: dict, label: str = ""):
    """Outputs and gradients equal the reference's to fp32 rounding."""
    for key in OUTPUTS:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"{label}{key}: {m}")


def build_layer(case: Case, tp: int, lora_config, break_init: bool = False):
    from megatron.core import ModelParallelConfig

    from megatron_lora import LoRAColumnParallelLinear, LoRARowParallelLinear

    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=case.sp and tp > 1,
                              use_cpu_initialization=True, perform_initialization=False)
    common = dict(config=cfg, init_method=torch.nn.init.zeros_, bias=case.bias,
                  skip_bias_add=case.skip_bias_add, lora_config=lora_config,
                  lora_init_name="decoder.layers.0.test", is_expert=case.expert)
    if case.kind == "column":
        return LoRAColumnParallelLinear(H_IN, H_OUT, gather_output=case.gather_output,
                                        disable_grad_reduce=case.disable_grad_reduce, **common)
    return LoRARowParallelLinear(H_IN, H_OUT, input_is_parallel=case.input_is_parallel, **common)


def load_base_shards(layer, column: bool, t):
    """This rank's shards of the base tensors of ``t`` into any parallel linear; frozen."""
    tp, rank = tp_rank()
    with torch.no_grad():
        layer.weight.copy_(t["weight"].chunk(tp, 0 if column else 1)[rank])
        if layer.bias is not None:
            layer.bias.copy_(t["bias"].chunk(tp, 0)[rank] if column else t["bias"])
        if hasattr(layer, "layer_norm_weight"):
            layer.layer_norm_weight.copy_(t["norm"])
    for name in ("weight", "bias", "layer_norm_weight"):
        if getattr(layer, name, None) is not None:
            getattr(layer, name).requires_grad_(False)  # frozen base, as apply_lora leaves it


def load_shards(layer, t):
    """This rank's shards of ``t`` into any LoRA layer (local, external or TE); the base frozen."""
    tp, rank = tp_rank()
    layout = layer.lora_layout
    load_base_shards(layer, layout.a_dim is None, t)  # column layers replicate A
    with torch.no_grad():
        for f in LORA_FACTORS:
            getattr(layer, f).copy_(layout.shard(f, t[f], rank, tp))


def local_input_and_grad(case: Case, t: dict):
    """This rank's X (a leaf wanting its gradient) and dY: the sequence chunk under SP, the hidden
    shard of a parallel row input or of a column output that is not gathered."""
    tp, rank = tp_rank()
    sp = case.sp and tp > 1 and not case.expert  # an expert layer gets the dispatcher's whole tokens
    x, dy = t["x"], t["dy"]
    if case.kind == "column":
        if sp:
            x = x.chunk(tp, 0)[rank]
        if not case.gather_output:
            dy = dy.chunk(tp, -1)[rank]
    else:
        if case.input_is_parallel:
            x = x.chunk(tp, -1)[rank]
        if sp:
            dy = dy.chunk(tp, 0)[rank]
    return x.clone().requires_grad_(True), dy


def run_case(case: Case, t: dict, lora_config, seed: int = 7):
    """On every rank: load this rank's shard of ``t``, forward + backward with dY, return locals."""
    tp, _ = tp_rank()
    layer = build_layer(case, tp, dataclasses.replace(lora_config, dropout=case.dropout))
    load_shards(layer, t)
    x, dy = local_input_and_grad(case, t)
    torch.manual_seed(seed)  # the dropout mask comes from the TP-synchronised default generator
    y, out_bias = layer(x)
    y.backward(dy)
    return dict(y=y.detach(), bias_out=None if out_bias is None else out_bias.detach(), dx=x.grad,
                dA=layer.lora_A.grad, dB=layer.lora_B.grad, weight_grad=layer.weight.grad,
                lora_A=layer.lora_A.detach())


def assemble(case: Case, per_rank: list, layout_gated: bool = False):
    """Logical tensors from all ranks' locals, by the docs/design.md §1 layout (SP partials summed)."""
    from megatron_lora.core.layout import AdapterLayout

    layout = AdapterLayout.column(layout_gated) if case.kind == "column" else AdapterLayout.row()
    sp = case.sp and len(per_rank) > 1 and not case.expert
    partial = sp or (case.sp and case.expert and len(per_rank) > 1)  # replicated grad: a partial sum
    pick = lambda k: [r[k] for r in per_rank]  # noqa: E731
    if case.kind == "column":
        y = pick("y")[0] if case.gather_output else torch.cat(pick("y"), -1)
        dx = torch.cat(pick("dx"), 0) if sp else (sum(pick("dx")) if case.caller_reduces else pick("dx")[0])
        dA = sum(pick("dA")) if partial else pick("dA")[0]
        dB = layout.unshard("lora_B", pick("dB"))
    else:
        y = torch.cat(pick("y"), 0) if sp else (sum(pick("y")) if case.caller_reduces else pick("y")[0])
        dx = torch.cat(pick("dx"), -1) if case.input_is_parallel else pick("dx")[0]
        dA = layout.unshard("lora_A", pick("dA"))
        dB = sum(pick("dB")) if partial else pick("dB")[0]
    return dict(y=y, dx=dx, dA=dA, dB=dB)


def worker_all_cases(cases, t, lora_config, breakage=contextlib.nullcontext):
    """Entry point for run_distributed: every case in one process group (spawning is slow).

    ``breakage``: a context manager of ``breakages`` to run the cases under."""
    with breakage():
        return [run_case(c, t, lora_config) for c in cases]


def worker_count_collectives(cases):
    """Collectives per forward and per backward, base layer vs LoRA layer, same settings."""
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_lora import LoRAConfig
    from tests.collective_count import count_collectives

    tp, _ = tp_rank()
    out = []
    for case in cases:
        counts = {}
        for variant in ("base", "lora", "naive"):
            if variant == "naive" and case.sp:
                continue  # the naive baseline has no SP path
            if variant == "lora":
                layer = build_layer(case, tp, LoRAConfig(rank=RANK, alpha=8))
                torch.nn.init.normal_(layer.lora_B)
            else:
                cfg = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=case.sp,
                                          use_cpu_initialization=True)
                kw = dict(config=cfg, init_method=torch.nn.init.normal_, bias=case.bias,
                          skip_bias_add=case.skip_bias_add, is_expert=case.expert)
                layer = (ColumnParallelLinear(H_IN, H_OUT, gather_output=case.gather_output, **kw)
                         if case.kind == "column" else
                         RowParallelLinear(H_IN, H_OUT, input_is_parallel=case.input_is_parallel, **kw))
            for p in (layer.weight, layer.bias):
                if p is not None:
                    p.requires_grad_(False)  # frozen base in every variant
            if variant == "naive":
                from tests.distributed.naive_lora import NaiveLoRA

                layer = NaiveLoRA(layer, RANK, 8)
            s = S // tp if (case.sp and not case.expert and case.kind == "column") else S
            h = H_IN // tp if (case.kind == "row" and case.input_is_parallel) else H_IN
            x = torch.randn(s, B, h, requires_grad=True)
            with count_collectives() as fwd:
                y, _ = layer(x)
            with count_collectives() as bwd:
                y.sum().backward()
            counts[variant] = dict(fwd=dict(fwd.calls), bwd=dict(bwd.calls),
                                   fwd_bytes=fwd.total_bytes, bwd_bytes=bwd.total_bytes)
        out.append(counts)
    return out
