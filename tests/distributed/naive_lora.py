"""The design most LoRA-on-Megatron stacks use, kept only as a baseline: the branch is built from
its own Megatron parallel linears, so it issues its own collectives next to the base layer's.

    column base:  y_i = base(x) + s * B_i(A(x)),  A = ColumnParallelLinear(in, r, gather_output=True)
                                                 B = ColumnParallelLinear(r, out)   (B_i sharded)
    row base:     y   = base(x) + s * B(A(x)),    A = RowParallelLinear(in, r)       (all-reduce)
                                                 B = torch Linear(r, out)          (replicated)

Per TP=2 layer (no SP) that is forward 1 + backward 2 extra collectives for a column layer and
forward 1 extra for a row layer. Not for SP (the branch would need its own sequence gathers).

The harness test ``test_harness_bites_a_branch_with_its_own_collectives`` proves with it that the
collective-count oracle flags this design; ``benchmarks/bench_lora_tp2.py`` times it as variant (c).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class NaiveLoRA(torch.nn.Module):
    def __init__(self, base, rank: int, alpha: float):
        super().__init__()
        if base.config.sequence_parallel:
            raise ValueError("the naive baseline does not support sequence parallelism")
        self.base, self.scaling = base, alpha / rank
        cfg, group = base.config, base.tp_group
        kw = dict(config=cfg, init_method=torch.nn.init.normal_, bias=False, tp_group=group)
        if isinstance(base, ColumnParallelLinear):
            self.lora_in = ColumnParallelLinear(base.input_size, rank, gather_output=True, **kw)
            self.lora_out = ColumnParallelLinear(rank, base.output_size, gather_output=base.gather_output, **kw)
        else:
            self.lora_in = RowParallelLinear(base.input_size, rank, input_is_parallel=base.input_is_parallel,
                                             skip_bias_add=True, **kw)
            self.lora_out = torch.nn.Linear(rank, base.output_size, bias=False,
                                            device=base.weight.device, dtype=base.weight.dtype)
        torch.nn.init.normal_(self.lora_out.weight, std=1e-3)

    def forward(self, x, *args, **kwargs):
        y, bias = self.base(x, *args, **kwargs)
        h = self.lora_in(x)[0]
        out = self.lora_out(h)
        out = out[0] if isinstance(out, tuple) else out
        return y + self.scaling * out, bias
