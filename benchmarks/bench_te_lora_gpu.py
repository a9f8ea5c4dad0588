"""LoRA training throughput vs the frozen base on one GPU, Transformer Engine and local specs.

    python3.11 benchmarks/bench_te_lora_gpu.py --json te_lora.json      # from the repo root, 1 GPU

Why: the TE LoRA layers (``megatron_lora.core.te_layers``) turn TE's communication off and run the
branch beside TE's GEMM; this measures the cost where it matters, 7B-wide layers (hidden 4096, 32
heads, SwiGLU ffn 11008, RMSNorm, RoPE, vocab 32000, bf16, TP=1) on a GPU. Target: LoRA/base >= 0.95.

One model per spec (``get_gpt_lora_layer_spec(cfg, transformer_impl=...)``, then ``apply_lora``
initialises the adapters and freezes everything else), timed twice in the same process:

    base   ``set_adapters_enabled(model, False)``: the frozen base, no optimizer step
    lora   adapters on, rank r, alpha 2r, on linear_qkv / linear_proj / linear_fc1 / linear_fc2

In BOTH runs a forward hook makes the embedding output require grad, so backward runs through
every layer in the baseline too (with no trainable parameter, ``loss.backward()`` would have no
graph at all); the two runs then differ only by the adapters. The base row on the TE spec is
therefore the LoRA-wrapped TE layers with adapters off, not a pristine Megatron TE model.

Optimizer: plain ``torch.optim.AdamW`` on ``lora_parameters(model)``, which are bf16 like the base.
There is no fp32 master copy (Megatron's optimizer would keep one); for a throughput number that
is immaterial: at rank 16 the adapters are ~0.5% of the layer weights, updated by a few small
multi-tensor kernels.
Dropout is 0 (Llama-style fine-tuning), so no run pays for a dropout kernel the other skips.

Both runs first take ``--warmup`` untimed steps each (so neither is timed colder than the other),
then each times ``--iters`` steps between two ``torch.cuda.synchronize``; tokens/s = iters *
micro-batch * seq-length / seconds. Peak memory is ``torch.cuda.max_memory_allocated`` over the
timed steps; weights, adapters and their AdamW state are in both (one shared model).
"""

import argparse
import gc
import importlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

HIDDEN, HEADS, FFN, VOCAB, SEED = 4096, 32, 11008, 32000, 1234
IMPLS = ("transformer_engine", "local")
GIB = 2.0 ** 30
NO_CUDA = ("error: bench_te_lora_gpu.py needs a CUDA GPU (and Transformer Engine for the TE rows); "
           "none found.")


def te_missing_reason():
    """None when the TE LoRA layers import, else why not (the TE rows are then skipped)."""
    try:
        importlib.import_module("megatron_lora.core.te_layers")  # imports transformer_engine itself
    except (ImportError, OSError) as error:
        return str(error)
    return None


def setup_distributed():
    """One-rank NCCL group, Megatron's parallel state at TP = PP = 1."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)


def build_model(impl, args):
    """GPTModel (bf16, on the GPU) of ``impl``'s spec with initialised adapters and a frozen base."""
    import torch.nn.functional as F
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    import megatron_lora
    from megatron_lora.core.gpt import build_gpt_stage

    model_parallel_cuda_manual_seed(SEED)  # resets the tracker: every spec starts from the same seed
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", bf16=True,
        params_dtype=torch.bfloat16, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)
    lora = megatron_lora.LoRAConfig(rank=args.rank, alpha=2 * args.rank, target_modules=(
        "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))
    # The training script's builder: TE spec (fused norms, TENorm last) or the local spec.
    model = build_gpt_stage(config, VOCAB, args.seq_length, lora_config=lora, transformer_impl=impl,
                            position_embedding_type="rope", share_embeddings_and_output_weights=False)
    # What Megatron's Float16Module does: the local spec's torch RMSNorms are built fp32 on the CPU.
    model = model.cuda().bfloat16()
    megatron_lora.apply_lora(model, lora)
    # Frozen embedding: its output would not require grad. Make it a leaf that does (both runs).
    model.embedding.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_(True))
    return model


def train_step(model, opt, batch):
    """Forward + backward (+ AdamW when ``opt``): one micro-batch."""
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
    loss.backward()
    if opt is not None:
        opt.step()


def measure(model, opt, batch, iters):
    """(tokens/s, peak bytes allocated) over ``iters`` steps."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        train_step(model, opt, batch)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return iters * batch["tokens"].numel() / seconds, torch.cuda.max_memory_allocated()


def bench_impl(impl, args):
    """One table row: base and LoRA of ``impl``'s spec, on the same model and batch."""
    import megatron_lora

    model = build_model(impl, args)
    model.train()
    shape = (args.micro_batch_size, args.seq_length)
    batch = dict(tokens=torch.randint(0, VOCAB, shape, device="cuda"),
                 labels=torch.randint(0, VOCAB, shape, device="cuda"),
                 position_ids=torch.arange(args.seq_length, device="cuda").expand(shape))
    opt = torch.optim.AdamW(megatron_lora.lora_parameters(model), lr=1e-4)
    runs = {"base": (False, None), "lora": (True, opt)}
    for enabled, run_opt in runs.values():  # warm both up before timing either: same conditions
        megatron_lora.set_adapters_enabled(model, enabled)
        for _ in range(args.warmup):
            train_step(model, run_opt, batch)
    opt.zero_grad(set_to_none=True)  # the base run holds no adapter grads
    stats = {}
    for name, (enabled, run_opt) in runs.items():
        megatron_lora.set_adapters_enabled(model, enabled)
        stats[name] = measure(model, run_opt, batch, args.iters)
    (base_tps, base_peak), (lora_tps, lora_peak) = stats["base"], stats["lora"]
    del model, opt, batch, runs
    gc.collect()
    torch.cuda.empty_cache()
    return dict(transformer_impl=impl, base_tokens_per_s=base_tps, lora_tokens_per_s=lora_tps,
                ratio=lora_tps / base_tps, base_peak_gib=base_peak / GIB, lora_peak_gib=lora_peak / GIB)


def format_table(result) -> str:
    a = result["settings"]
    lines = [f"LoRA vs frozen base, {result['device']}: hidden {HIDDEN}, {a['layers']} layers, seq "
             f"{a['seq_length']}, micro-batch {a['micro_batch_size']}, rank {a['rank']}, bf16, TP=1, "
             f"{a['iters']} timed steps after {a['warmup']}", "",
             "| spec | base tokens/s | LoRA tokens/s | LoRA/base (target >= 0.95) | "
             "base peak GiB | LoRA peak GiB |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        verdict = "ok" if r["ratio"] >= 0.95 else "BELOW"
        lines.append(f"| {r['transformer_impl']} | {r['base_tokens_per_s']:.0f} | {r['lora_tokens_per_s']:.0f} | "
                     f"{r['ratio']:.3f} {verdict} | {r['base_peak_gib']:.2f} | {r['lora_peak_gib']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 * rank)")
    ap.add_argument("--iters", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per run first")
    ap.add_argument("--transformer-impl", choices=IMPLS + ("both",), default="both")
    ap.add_argument("--json", metavar="PATH", help="also write the JSON result to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():  # checked before Megatron's import, which may warn on stderr
        print(NO_CUDA, file=sys.stderr)
        return 2
    impls = list(IMPLS) if args.transformer_impl == "both" else [args.transformer_impl]
    reason = te_missing_reason() if "transformer_engine" in impls else None
    skipped = {} if reason is None else {"transformer_engine": reason}
    if skipped:
        impls.remove("transformer_engine")
        print(f"skipping the transformer_engine rows: {reason}", file=sys.stderr if not impls else sys.stdout)
        if not impls:
            return 2
    setup_distributed()
    rows = [bench_impl(impl, args) for impl in impls]
    result = dict(bench="te_lora_gpu", device=torch.cuda.get_device_name(), torch=torch.__version__,
                  settings=vars(args), rows=rows, skipped=skipped)
    print(format_table(result))
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
