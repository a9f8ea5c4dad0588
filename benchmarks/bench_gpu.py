"""LoRA training throughput and activation memory against a pristine frozen Megatron GPT, one GPU.

    python benchmarks/bench_gpu.py --json bench_gpu.jsonl      # from the repo root, 1 GPU, TP=1
    python benchmarks/bench_gpu.py --num-experts 8 --moe-topk 2 --moe-ffn 2816 --json bench_gpu.jsonl
                                                               # the MoE shape (not yet run on a GPU)
    python benchmarks/bench_gpu.py --kernel-table              # the branch kernels, torch vs Triton
    python benchmarks/bench_gpu.py --device cpu --dtype fp32 --hidden 64 --heads 4 --groups 2 \\
        --ffn 128 --layers 2 --vocab 128 --seq 32 --reps 1 --iters 1    # CPU smoke run (gloo)

Default shape: a 7B-wide GPT (hidden 4096, 32 heads / 8 query groups, SwiGLU ffn 11008, RMSNorm,
RoPE, no biases, no dropout), 8 layers, vocab 32000, sequence 4096, micro-batch 1, bf16, TP=1;
LoRA rank 16, alpha 32, on linear_qkv / linear_proj / linear_fc1 / linear_fc2. Every variant is
Megatron's LOCAL GPT layer spec with the same fast core attention (``SDPAttention`` below: torch's
``scaled_dot_product_attention``, causal, GQA by ``enable_gqa`` (no K/V copies), never the unfused
math kernel on a GPU; Transformer Engine's ``TEDotProductAttention`` instead when TE imports, see
``--attention``) and the SAME base weights: Megatron's init draws them once for the first model,
they are kept on the CPU and loaded into every later one, built one after the other.

MoE shape (``--num-experts N``, issue 25; off by default): every layer's MLP is Megatron's MoE
layer on the local spec instead (``get_gpt_layer_local_spec(num_experts=N)``): a top-``--moe-topk``
softmax router (frozen in every variant, never adapted, no auxiliary loss), the all-to-all token
dispatcher, and N ``SequentialMLP`` experts of SwiGLU ffn ``--moe-ffn`` (default ``--ffn``), EP = 1.
The LoRA variants adapt every expert's linear_fc1 / linear_fc2 as well (one adapter per expert);
``separate_branch`` wraps them too. SequentialMLP runs the experts one after the other, so this
measures the local path, not Transformer Engine's grouped experts. The variants:

    frozen              Megatron's GPTModel, no megatron_lora code in it, every parameter frozen;
                        backward to the inputs only, no optimizer step
    lora                ``megatron_lora.apply_lora`` with the default ``LoRAConfig`` (branch
                        kernels "auto": plain torch until ``kernels.MEASURED`` has rows for this
                        GPU); AdamW on ``lora_parameters``
    lora_triton_kernels the same with ``branch_kernels="triton"`` (left out, with the reason in
                        the JSON's ``skipped``, where the kernels cannot run: no triton, or a CPU
                        without ``TRITON_INTERPRET=1``)
    lora_recompute      the same with ``recompute_branch_input=True``
    separate_branch     LoRA as most libraries build it: y = base(x) + s * B(A(x)) with A, B plain
                        ``torch.nn.Linear`` modules beside each untouched Megatron linear; AdamW on A, B

Why the pristine model is the baseline: our LoRA model with its adapters switched off still runs
our layers' code paths (and the benchmark this one replaces, bench_te_lora_gpu.py, also used
Megatron's unfused attention, whose cost made everything else look cheap). The question a user asks is what fine-tuning costs over running the
frozen model, so the denominator is plain Megatron with the same fast attention. In every variant a
forward hook makes the embedding output require grad, so backward runs through every layer down to
the inputs (without it the frozen model would have no backward at all); the LoRA variants thus
also pay for the layer-0 input gradients they would not need, which counts against them. Before
timing, every variant's per-token losses are checked against the frozen model's (B = 0 at init, so
they must agree: same weights) and the run stops if they do not.

Timing: each variant first takes ``--warmup`` untimed steps; then ``--reps`` rounds, each timing
``--iters`` steps of every variant in turn (interleaved, so drift hits all of them alike) between
two ``torch.cuda.synchronize``; tokens/s = iters * micro-batch * seq / seconds, median over reps.
A step is forward + loss + backward (+ AdamW + zero_grad(set_to_none) for the trainable ones).
Memory: before each timed round of a variant, ``torch.cuda.memory_allocated`` (every model's weights,
the adapters' AdamW state, nothing else: grads are freed at the end of each step) is subtracted from
``torch.cuda.max_memory_allocated`` after the round, the peak statistics reset just before it; the
activation peak is the largest such difference over reps (it includes the adapters' grads, tiny).
All models stay on the GPU (8 layers of 7B width in bf16 are ~3.4 GB each). On CPU there are no
allocator statistics: the peak is null there.

Output: a markdown table on stdout and ONE JSON line per run (also appended to ``--json PATH``).

``--kernel-table``: no model; each product of the branch (``down`` and ``up`` at every target's
input width, ``dy`` at every output width, micro-batch x seq tokens, ``--rank``, ``--dtype``) is
checked against plain torch and timed both ways (``--reps`` rounds of ``--iters`` calls after
``--warmup``, median). Prints one ``kernels.Measurement(...)`` line per product, the rows ``auto``
consults: paste the lines of a GPU run into ``kernels.MEASURED`` (docs/design.md §15). A CPU run
(``TRITON_INTERPRET=1``) exercises the path only; its rows name the CPU and ``auto`` never uses them.
"""

import argparse
import contextlib
import datetime
import json
import os
import socket
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

VARIANTS = ("frozen", "lora", "lora_triton_kernels", "lora_recompute", "separate_branch")
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
GIB = 2.0 ** 30
FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
NO_CUDA = "error: bench_gpu.py --device cuda needs a CUDA GPU and none was found (--device cpu runs the smoke test)."


class SDPAttention(torch.nn.Module):
    """Megatron's ``core_attention`` interface (as ``DotProductAttention``, megatron-core 0.16 and
    0.19) on ``torch.nn.functional.scaled_dot_product_attention``. In: query [s, b, n, d], key and
    value [s, b, g, d] (g query groups); out: [s, b, n * d]. A given mask is Megatron's (True =
    masked out); without one, a causal layer is causal."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type=None, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **unused):
        super().__init__()
        if config.context_parallel_size != 1 or config.apply_query_key_layer_scaling:
            raise ValueError("SDPAttention: no context parallelism, no query-key layer scaling")
        self.config, self.attn_mask_type, self.softmax_scale = config, attn_mask_type, softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        from megatron.core.transformer.enums import AttnMaskType

        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention: no attention bias, no packed sequences")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and attention_mask is None
        # On a GPU never the unfused math kernel: an error beats a silently slow baseline.
        with sdpa_kernel(FUSED_SDPA) if q.is_cuda else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if attention_mask is None else ~attention_mask, is_causal=causal,
                dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale,
                enable_gqa=q.size(1) != k.size(1))
        return out.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), -1)


class SeparateBranch(torch.nn.Module):
    """y = base(x) + s * B(A(x)): the branch as its own torch Linears beside a frozen Megatron
    linear (TP=1), B zero-initialised like LoRA's; returns the base's (output, bias)."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scaling = base, alpha / rank
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = torch.nn.Linear(base.weight.shape[1], rank, **kw)
        self.lora_B = torch.nn.Linear(rank, base.weight.shape[0], **kw)
        torch.nn.init.zeros_(self.lora_B.weight)

    def forward(self, x, *args, **kwargs):
        y, bias = self.base(x, *args, **kwargs)
        return y + self.scaling * self.lora_B(self.lora_A(x)), bias


def te_attention():
    """Megatron's TE core attention when Transformer Engine imports on a GPU, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        import transformer_engine  # noqa: F401  (without it Megatron's TE classes are MagicMocks)
        from megatron.core.extensions.transformer_engine import HAVE_TE, TEDotProductAttention
    except (ImportError, OSError, RuntimeError):
        return None
    return TEDotProductAttention if HAVE_TE else None


def moe_fields(a) -> dict:
    """The TransformerConfig fields of the MoE shape (none for the dense one)."""
    if not a.num_experts:
        return {}
    return dict(num_moe_experts=a.num_experts, moe_router_topk=a.moe_topk, moe_ffn_hidden_size=a.moe_ffn or a.ffn,
                moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False)


def gpt_config(a):
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    return TransformerConfig(
        num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads, num_query_groups=a.groups,
        ffn_hidden_size=a.ffn, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, bf16=a.dtype == "bf16",
        params_dtype=dtype, bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        bias_activation_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False, **moe_fields(a))


def layer_spec(core_attention, num_experts=0):
    """Megatron's local GPT layer spec (RMSNorm; with ``num_experts``, its MoE MLP of SequentialMLP
    experts) with ``core_attention`` as its core attention."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=num_experts or None, moe_grouped_gemm=False, normalization="RMSNorm")
    attn = spec.submodules.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=core_attention))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn))


def build(variant, a, spec, weights, device):
    """(model, optimizer or None) of one variant, base weights loaded from ``weights`` (CPU)."""
    from megatron.core.models.gpt import GPTModel

    import megatron_lora

    config = gpt_config(a)
    config.perform_initialization = weights is None  # the first model draws the one weight set
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=a.vocab, max_sequence_length=a.seq,
                     position_embedding_type="rope", share_embeddings_and_output_weights=False)
    model = model.to(device=device, dtype=config.params_dtype)  # torch norms: as Float16Module does
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    model.requires_grad_(False)
    if variant == "separate_branch":
        for name, module in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] in TARGETS:
                parent, leaf = name.rsplit(".", 1)
                setattr(model.get_submodule(parent), leaf, SeparateBranch(module, a.rank, 2 * a.rank))
    elif variant != "frozen":
        extra = {"lora_triton_kernels": dict(branch_kernels="triton"),
                 "lora_recompute": dict(recompute_branch_input=True)}.get(variant, {})
        megatron_lora.apply_lora(model, megatron_lora.LoRAConfig(
            rank=a.rank, alpha=2 * a.rank, target_modules=TARGETS, **extra))
    # Backward down to the inputs in every variant: the embedding output becomes a grad-requiring leaf.
    model.embedding.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_(True))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, (torch.optim.AdamW(params, lr=1e-4) if params else None)


def step(model, opt, batch):
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float().mean()
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def timed_round(model, opt, batch, iters, cuda):
    """(seconds for ``iters`` steps, activation peak bytes or None)."""
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step(model, opt, batch)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated() - before) if cuda else None


def setup(device):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if device == "cpu":
        from megatron_lora.cpu import enable_cpu

        enable_cpu()
    else:
        torch.cuda.set_device(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo" if device == "cpu" else "nccl", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)


def run(a):
    """Build every variant, time them interleaved; the result dict (one JSON line)."""
    import megatron.core

    cuda = a.device == "cuda"
    te = te_attention() if a.attention in ("auto", "te") else None
    if a.attention == "te" and te is None:
        raise SystemExit("error: --attention te needs Transformer Engine on a GPU; it does not import here.")
    spec = layer_spec(te or SDPAttention, a.num_experts)
    runs, weights = {}, None
    skipped = {}
    reason = triton_unavailable(cuda)
    if reason:
        skipped["lora_triton_kernels"] = reason
    variants = [name for name in VARIANTS if name not in skipped]
    for name in variants:  # sequentially, all from the frozen model's weights (kept on the CPU)
        runs[name] = build(name, a, spec, weights, a.device)
        if weights is None:
            weights = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in runs[name][0].state_dict().items()}
    shape = (a.micro_batch, a.seq)
    gen = torch.Generator().manual_seed(0)
    batch = {k: torch.randint(0, a.vocab, shape, generator=gen).to(a.device) for k in ("tokens", "labels")}
    batch["position_ids"] = torch.arange(a.seq, device=a.device).expand(shape)
    with torch.no_grad():  # same weights, B = 0: every variant starts at the frozen model's token losses
        token_losses = {n: m(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float()
                        for n, (m, _) in runs.items()}
    losses = {n: (t.mean().item(), (t - token_losses["frozen"]).abs().max().item()) for n, t in token_losses.items()}
    tolerance = 0.25 if a.dtype == "bf16" else 1e-3  # other weights differ by ~1 on some token
    bad = {n: v for n, v in losses.items() if v[1] > tolerance}
    if bad:
        raise RuntimeError(f"(mean, max token difference) of the initial losses are not the frozen model's: {bad}")
    for model, opt in runs.values():
        for _ in range(a.warmup):
            step(model, opt, batch)
    seconds, peaks = {n: [] for n in variants}, {n: [] for n in variants}
    for _ in range(a.reps):
        for name in variants:
            sec, peak = timed_round(*runs[name], batch, a.iters, cuda)
            seconds[name].append(sec)
            peaks[name].append(peak)
    tokens = a.iters * a.micro_batch * a.seq
    rows = {}
    for name in variants:
        tps = tokens / statistics.median(seconds[name])
        peak = max(peaks[name]) / GIB if cuda else None
        rows[name] = dict(tokens_per_s=tps, activation_peak_gib=peak, initial_loss=losses[name][0],
                          initial_token_loss_max_diff=losses[name][1],
                          trainable_params=sum(p.numel() for p in runs[name][0].parameters() if p.requires_grad))
    for row in rows.values():
        row["tokens_per_s_vs_frozen"] = row["tokens_per_s"] / rows["frozen"]["tokens_per_s"]
        row["activation_peak_vs_frozen"] = (row["activation_peak_gib"] / rows["frozen"]["activation_peak_gib"]
                                            if cuda else None)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    config = {k: v for k, v in vars(a).items() if k != "json"}
    return dict(bench="bench_gpu", date=datetime.datetime.now().isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
                torch=torch.__version__, megatron_core=megatron.core.__version__, triton=triton_version,
                core_attention="te" if te else "sdpa", tp=1, config=config, variants=rows, skipped=skipped)


def triton_unavailable(cuda: bool):
    """Why the Triton kernels cannot run here (None when they can)."""
    from megatron_lora.core import kernels

    reason = kernels.triton_missing_reason()
    if reason is None and not cuda and not kernels.interpreting():
        reason = "CPU without TRITON_INTERPRET=1"
    return reason


def product_inputs(product, tokens, width, rank, dtype, device):
    """Random inputs of one branch product at (tokens, width) and the call that runs it on ``impl``."""
    g = torch.Generator(device=device).manual_seed(width + rank)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)  # noqa: E731
    if product == "down":
        x, a = rnd(tokens, width), rnd(rank, width)
        return lambda impl: impl.down(x, a)
    if product == "dy":
        dy, b, u = rnd(tokens, width), rnd(width, rank), rnd(tokens, rank)
        return lambda impl: impl.dy(dy, b, u, 0.5)
    g_in, x, like = rnd(tokens, rank), rnd(tokens, width), rnd(rank, width)
    return lambda impl: impl.up(g_in, x, 0.5, like)


def time_us(fn, a, cuda) -> float:
    """Median over ``a.reps`` rounds of the mean microseconds per call of ``a.iters`` calls."""
    for _ in range(a.warmup):
        fn()
    rounds = []
    for _ in range(a.reps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(a.iters):
            fn()
        if cuda:
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / a.iters * 1e6)
    return statistics.median(rounds)


def kernel_table(a):
    """``kernels.Measurement`` rows: every branch product of the four targets' widths (TP=1)."""
    from megatron_lora.core import kernels

    cuda = a.device == "cuda"
    reason = triton_unavailable(cuda)
    if reason:
        raise SystemExit(f"error: --kernel-table needs the Triton kernels to run here: {reason}.")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    head = a.hidden // a.heads
    shapes = [(a.hidden, (a.heads + 2 * a.groups) * head), (a.hidden, a.hidden), (a.hidden, 2 * a.ffn),
              (a.ffn, a.hidden)]  # (in, out) of linear_qkv, linear_proj, linear_fc1 (gated), linear_fc2
    products = sorted({(p, k) for k, _ in shapes for p in ("down", "up")} | {("dy", n) for _, n in shapes})
    tokens, date = a.micro_batch * a.seq, datetime.date.today().isoformat()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    triton_kernels = kernels.select("triton", torch.empty(1, device=a.device, dtype=dtype), a.rank)
    if triton_kernels is kernels.TorchKernels:
        raise SystemExit("error: the Triton kernels failed their self-check here (see the warning above).")
    rows = []
    for product, width in products:
        call = product_inputs(product, tokens, width, a.rank, dtype, a.device)
        for got, ref in zip(*(torch.utils._pytree.tree_leaves(call(impl)) for impl in (triton_kernels,
                                                                                       kernels.TorchKernels))):
            error = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            if not error <= (1e-4 if dtype == torch.float32 else 2e-2):
                raise SystemExit(f"error: {product} at width {width}: Triton is {error:.2e} from plain torch.")
        rows.append(kernels.Measurement(
            device=device, date=date, product=product, dtype=str(dtype).replace("torch.", ""), rank=a.rank,
            width=width, tokens=tokens, torch_us=round(time_us(lambda: call(kernels.TorchKernels), a, cuda), 1),
            triton_us=round(time_us(lambda: call(triton_kernels), a, cuda), 1)))
    return rows


def format_table(r) -> str:
    c = r["config"]
    mlp = (f"MoE: {c['num_experts']} SequentialMLP experts of ffn {c['moe_ffn'] or c['ffn']}, top-{c['moe_topk']}"
           if c.get("num_experts") else f"ffn {c['ffn']}")
    lines = [f"LoRA vs the pristine frozen Megatron GPT, {r['device']} ({r['date']}), torch {r['torch']}, "
             f"megatron-core {r['megatron_core']}, {r['core_attention']} attention, TP=1, {c['dtype']}",
             f"hidden {c['hidden']}, {c['heads']} heads / {c['groups']} groups, {mlp}, {c['layers']} "
             f"layers, vocab {c['vocab']}, seq {c['seq']}, micro-batch {c['micro_batch']}, rank {c['rank']}; "
             f"median of {c['reps']} interleaved reps x {c['iters']} steps after {c['warmup']} warm-up", "",
             "| variant | tokens/s | vs frozen | activation peak GiB | vs frozen |", "|---|---:|---:|---:|---:|"]
    for name, v in r["variants"].items():
        mem = ("n/a", "n/a") if v["activation_peak_gib"] is None else (
            f"{v['activation_peak_gib']:.2f}", f"{v['activation_peak_vs_frozen']:.3f}")
        lines.append(f"| {name} | {v['tokens_per_s']:,.0f} | {v['tokens_per_s_vs_frozen']:.3f} | {mem[0]} | {mem[1]} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("hidden", 4096), ("heads", 32), ("groups", 8), ("ffn", 11008), ("layers", 8),
                          ("vocab", 32000), ("seq", 4096), ("micro-batch", 1), ("rank", 16)):
        ap.add_argument(f"--{flag}", type=int, default=default)
    ap.add_argument("--num-experts", type=int, default=0,
                    help="MoE shape: this many SequentialMLP experts per layer (0: the dense MLP)")
    ap.add_argument("--moe-topk", type=int, default=2, help="MoE shape: experts per token")
    ap.add_argument("--moe-ffn", type=int, default=None, help="MoE shape: each expert's ffn (default --ffn)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved timed rounds per variant")
    ap.add_argument("--iters", type=int, default=10, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--attention", choices=("auto", "sdpa", "te"), default="auto",
                    help="core attention of every variant; auto: TE's when it imports, else SDPA")
    ap.add_argument("--json", metavar="PATH", help="append the run's JSON line to this file")
    ap.add_argument("--kernel-table", action="store_true",
                    help="time the branch kernels (torch vs Triton) and print kernels.Measurement rows")
    a = ap.parse_args(argv)
    if min(a.reps, a.iters, a.layers) < 1 or a.warmup < 0:
        ap.error("--reps, --iters and --layers must be >= 1, --warmup >= 0")
    if a.num_experts < 0 or (a.num_experts and not 1 <= a.moe_topk <= a.num_experts) or (a.moe_ffn or 1) < 1:
        ap.error(f"--num-experts must be >= 0 and --moe-topk between 1 and --num-experts, --moe-ffn >= 1; got "
                 f"{a.num_experts}, {a.moe_topk}, {a.moe_ffn}")
    if a.device == "cuda" and not torch.cuda.is_available():  # before Megatron's import and its warnings
        print(NO_CUDA, file=sys.stderr)
        return 2
    if a.kernel_table:
        try:
            rows = kernel_table(a)
        except SystemExit as error:
            print(error, file=sys.stderr)
            return 2
        for row in rows:
            print(f"    {row!r},")
        line = json.dumps(dict(bench="bench_gpu_kernels", rows=[vars(row) for row in rows]))
        print(line)
        if a.json:
            with open(a.json, "a") as f:
                f.write(line + "\n")
        return 0
    setup(a.device)
    result = run(a)
    print(format_table(result))
    line = json.dumps(result)
    print(line)
    if a.json:
        with open(a.json, "a") as f:
            f.write(line + "\n")
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
