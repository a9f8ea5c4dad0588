"""Cost of LoRA per optimizer step at TP=2: frozen base vs our LoRA vs the naive LoRA.

    python -m benchmarks.bench_lora_tp2 --out bench.md      # from the repo root, ~3-4 min on 2 cores

``--json PATH`` also writes the measurements (``run_benchmark``'s result) as JSON.

Two real gloo ranks (TP=2, CPU, one thread each, via ``tests.distributed.launcher``) build a small
GPT (GQA 16 heads / 4 query groups, SwiGLU, RMSNorm, RoPE, fp32, vocab 1024, micro-batch 1) from
the SAME base weights and time one optimizer step (forward + backward + AdamW over the trainable
parameters) of each variant:

    base   every parameter frozen: backward computes input gradients only
    lora   ``megatron_lora.apply_lora`` on linear_qkv / linear_proj / linear_fc1 / linear_fc2
    naive  ``benchmarks.naive_lora`` (``tests/distributed/naive_lora.py``'s layer): the branch as
           its own parallel linears (own collectives)

plus base and lora again with sequence parallelism (the naive baseline has no SP). Every variant
is fed through ``GPTModel.forward(decoder_input=x)`` with ``x.requires_grad``, so all of them run
backward down to layer 0. Variants are interleaved (rep by rep) because the host is noisy; a step
time is the slower rank's, after a barrier, and the table shows the median over reps.

One extra, untimed step per variant measures: the TP collectives of forward + backward (calls and
payload bytes a rank sends, ``tests/collective_count.py``); the activation memory
saved for backward (tensors packed by autograd, deduplicated by storage, parameters excluded: CPU
has no peak-allocator statistics); and the bytes of trainable parameters + grads + AdamW state.
All memory figures are per rank.
"""

import argparse
import datetime
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.report import emit  # noqa: E402

VOCAB, HEADS, GROUPS = 1024, 16, 4
# (name, variant, sequence parallel): the order in which each rep times them
VARIANTS = [("(a) base", "base", False), ("(b) lora", "lora", False), ("(c) naive", "naive", False),
            ("(a) base SP", "base", True), ("(b) lora SP", "lora", True)]
MIB = 2.0 ** 20


def build(variant, sp, shape, base_params):
    """The GPT of one variant on this rank; base weights copied from ``base_params`` if given."""
    from benchmarks.naive_lora import apply_naive_lora
    from megatron_lora import LoRAConfig, apply_lora
    from megatron_lora.training.gpt import build_gpt_stage
    from tests.distributed.models import tiny_gpt_config

    config = tiny_gpt_config(tp=2, sp=sp, num_layers=shape["layers"], hidden_size=shape["hidden"],
                             ffn_hidden_size=shape["ffn"], num_attention_heads=HEADS,
                             num_query_groups=GROUPS)
    model = build_gpt_stage(config, VOCAB, shape["seq"], position_embedding_type="rope",
                            share_embeddings_and_output_weights=False)
    if base_params is not None:  # same names before the adapters go in; KeyError if not
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base_params[name])
    if variant == "lora":
        apply_lora(model, LoRAConfig(rank=shape["rank"], alpha=2 * shape["rank"]))
    elif variant == "naive":
        apply_naive_lora(model, rank=shape["rank"], alpha=2 * shape["rank"])
    else:
        model.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None  # AdamW refuses an empty list
    return model, opt


def step(model, opt, x_full, labels, sp):
    """One optimizer step; ``x_full`` [s, 1, h] is the same on both ranks (SP: keep my chunk)."""
    from megatron.core import parallel_state as ps

    if sp:
        x_full = x_full.chunk(2, dim=0)[ps.get_tensor_model_parallel_rank()]
    x = x_full.detach().clone().requires_grad_(True)  # backward runs down to layer 0
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    loss = model(None, None, None, decoder_input=x, labels=labels).mean()
    loss.backward()
    if opt is not None:
        opt.step()


def saved_bytes_and_collectives(model, opt, x_full, labels, sp):
    """(activation bytes saved for backward, collective log) of one untimed step."""
    from tests.collective_count import count_collectives

    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with count_collectives() as log, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(model, opt, x_full, labels, sp)
    return sum(saved.values()), log


def state_bytes(opt):
    """Trainable parameters + their grads + the optimizer state tensors, in bytes."""
    if opt is None:
        return 0
    params = [p for g in opt.param_groups for p in g["params"]]
    total = sum(2 * p.numel() * p.element_size() for p in params)  # the parameter and its grad
    return total + sum(v.numel() * v.element_size() for s in opt.state.values()
                       for v in s.values() if torch.is_tensor(v))


def _rank_worker(shape, reps, warmup):
    """Runs on each rank (after ``run_distributed``'s setup); returns per-variant measurements."""
    import torch.distributed as dist

    torch.manual_seed(0)
    x_full = torch.randn(shape["seq"], 1, shape["hidden"])
    labels = torch.randint(0, VOCAB, (1, shape["seq"]))
    runs = {"(a) base": build("base", False, shape, None)}  # its weights are everyone's base
    base_params = dict(runs["(a) base"][0].named_parameters())
    runs.update({name: build(variant, sp, shape, base_params) for name, variant, sp in VARIANTS[1:]})
    out = {}
    for name, _, sp in VARIANTS:
        model, opt = runs[name]
        for _ in range(warmup):
            step(model, opt, x_full, labels, sp)
        saved, log = saved_bytes_and_collectives(model, opt, x_full, labels, sp)
        out[name] = dict(times=[], calls=log.total_calls, comm_bytes=log.total_bytes,
                         saved=saved, state=state_bytes(opt))
    for _ in range(reps):
        for name, _, sp in VARIANTS:
            dist.barrier()  # both ranks start the step together
            start = time.perf_counter()
            step(*runs[name], x_full, labels, sp)
            out[name]["times"].append(time.perf_counter() - start)
    out["threads"] = torch.get_num_threads()
    return out


def run_benchmark(hidden=1024, ffn=2816, layers=2, seq=256, rank=16, reps=100, warmup=2):
    """Both ranks' measurements, reduced to one row per variant (see the module docstring)."""
    from tests.distributed.launcher import run_distributed

    shape = dict(hidden=hidden, ffn=ffn, layers=layers, seq=seq, rank=rank)
    ranks = run_distributed(_rank_worker, 2, shape, reps, warmup, tp=2, timeout=3600)
    rows = {}
    for name, _, _ in VARIANTS:
        r0 = ranks[0][name]
        slowest = [max(r[name]["times"][i] for r in ranks) for i in range(reps)]
        q1, _, q3 = statistics.quantiles(slowest, n=4) if reps > 1 else (slowest[0],) * 3
        rows[name] = dict(r0, median_s=statistics.median(slowest), q1_s=q1, q3_s=q3)
    return dict(rows=rows, shape=shape, reps=reps, warmup=warmup, threads=ranks[0]["threads"])


def format_table(result) -> str:
    import megatron.core

    rows, sh = result["rows"], result["shape"]
    lines = [
        f"# LoRA step cost at TP=2 ({datetime.date.today().isoformat()})", "",
        f"- torch {torch.__version__}, megatron-core {megatron.core.__version__}, CPU + gloo, "
        f"2 ranks x {result['threads']} thread(s), {os.cpu_count()} cores on the host",
        f"- GPT: hidden {sh['hidden']}, ffn {sh['ffn']} (SwiGLU), {HEADS} heads / {GROUPS} query "
        f"groups, {sh['layers']} layers, seq {sh['seq']}, micro-batch 1, vocab {VOCAB}, fp32",
        f"- LoRA rank {sh['rank']}, alpha {2 * sh['rank']}, on qkv / proj / fc1 / fc2; "
        f"{result['reps']} interleaved reps after {result['warmup']} warm-up steps", "",
        "| variant | median step (ms) | p25-p75 (ms) | vs its base | TP collectives / step (fwd+bwd) | "
        "collective payload / step (MiB) | activation memory saved for backward (MiB) | "
        "trainable params + grads + AdamW state (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, variant, sp in VARIANTS:
        r = rows[name]
        base = rows["(a) base SP" if sp else "(a) base"]["median_s"]
        lines.append(f"| {name} | {1e3 * r['median_s']:.1f} | {1e3 * r['q1_s']:.0f}-{1e3 * r['q3_s']:.0f} | "
                     f"{r['median_s'] / base:.3f}x | "
                     f"{r['calls']} | {r['comm_bytes'] / MIB:.2f} | {r['saved'] / MIB:.1f} | "
                     f"{r['state'] / MIB:.2f} |")
    lines += ["", "Step = forward + backward (input grads down to layer 0) + AdamW; time = slower "
              "rank after a barrier; memory and payload per rank; target (docs/design.md §3): (b) <= 1.10x (a) "
              "and the same collective count."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 * rank)")
    ap.add_argument("--reps", type=int, default=100, help="timed steps per variant, interleaved")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--json", help="also write the measurements to this file as JSON")
    args = ap.parse_args(argv)
    result = run_benchmark(args.hidden, args.ffn, args.layers, args.seq, args.rank, args.reps, args.warmup)
    emit(format_table(result), result, args.out, args.json)


if __name__ == "__main__":
    # Re-enter through the package, so the rank function pickles as benchmarks.bench_lora_tp2.*
    from benchmarks.bench_lora_tp2 import main as _main

    _main()
