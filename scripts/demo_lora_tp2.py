"""TP=2 LoRA demo on CPU: pretrain a tiny GPT on Python code, then LoRA-fine-tune it on prose.

    torchrun --nproc-per-node 2 scripts/demo_lora_tp2.py          # or: bash scripts/demo.sh

The corpus is read at run time from this machine's Python standard library (no download, no
text in the repository): part A is module source with its docstrings removed, part B is the
docstrings themselves, a clearly different distribution. The base is trained on A; then its
weights are frozen, LoRA goes on all four linears (tensor-parallel, gloo), and only the adapter
trains on B. It prints the frozen-base and LoRA validation loss on B and checks that every
replicated LoRA factor is bitwise identical on both TP ranks.
"""

import argparse
import ast
import os
import pathlib
import sysconfig
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-steps", type=int, default=150)
    p.add_argument("--lora-steps", type=int, default=100)
    p.add_argument("--max-files", type=int, default=120, help="stdlib modules to read")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


def stdlib_corpus(max_files):
    """(code, prose) byte tensors from the stdlib's own modules, docstrings split from code."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    code, prose = [], []
    for path in sorted(root.glob("*.py"))[:max_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    prose.append(doc)
                    node.body = node.body[1:] or [ast.Pass()]
        code.append(ast.unparse(tree))
    as_bytes = lambda texts: torch.tensor(list("\n\n".join(texts).encode()), dtype=torch.long)  # noqa: E731
    return as_bytes(code), as_bytes(prose)


def build_model(args, tp):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=4 * args.hidden_size,
        num_attention_heads=8, num_query_groups=4, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, bias_activation_fusion=False, persist_layer_norm=False)
    return GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=256,
                    max_sequence_length=args.seq_length, position_embedding_type="rope")


def batch(data, args, gen):
    """Random windows; the generator is seeded identically on every TP rank (same data)."""
    starts = torch.randint(0, len(data) - args.seq_length - 1, (args.micro_batch_size,), generator=gen)
    windows = torch.stack([data[s:s + args.seq_length + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def loss_of(model, tokens, labels):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, positions, None, labels=labels).float().mean()


def train(model, params, data, steps, lr, args, label, log):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen, start = torch.Generator().manual_seed(args.seed), time.time()
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = loss_of(model, *batch(data, args, gen))
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            log(f"[{label}] step {step:4d}/{steps}  loss {loss.item():.4f}  {time.time() - start:6.1f}s")


@torch.no_grad()
def evaluate(model, data, args, batches=8):
    gen = torch.Generator().manual_seed(args.seed + 1)
    return sum(loss_of(model, *batch(data, args, gen)).item() for _ in range(batches)) / batches


def replicated_factors_identical(model, group):
    """Bitwise comparison of every replicated LoRA factor across the TP group."""
    from megatron_lora import lora_modules

    same = total = 0
    for m in lora_modules(model):
        for factor in ("lora_A", "lora_B"):
            if m.lora_layout.partition_dim(factor) is None:
                mine = getattr(m, factor).detach()
                copies = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
                dist.all_gather(copies, mine.contiguous(), group=group)
                same += all(torch.equal(c, copies[0]) for c in copies)
                total += 1
    return same, total


def main():
    args = parse_args()
    # Megatron announces its CPU fallbacks (no Apex / Transformer Engine) at import; on CPU they are
    # the expected path, so the demo keeps its output readable. The library filters nothing.
    for message in (".*(Apex|Transformer Engine) (is|are) not installed.*", ".*cuda_graph_scope.*",
                    ".*CUDA_DEVICE_MAX_CONNECTIONS.*"):
        warnings.filterwarnings("ignore", message=message)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_lora import LoRAConfig, adapters_disabled, apply_lora, lora_parameters
    from megatron_lora.cpu import enable_cpu

    cpu = enable_cpu()
    dist.init_process_group("gloo" if cpu else "nccl")
    tp = dist.get_world_size()
    if not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)
    rank0 = dist.get_rank() == 0
    log = lambda msg: print(msg, flush=True) if rank0 else None  # noqa: E731

    code, prose = stdlib_corpus(args.max_files)
    split = int(0.9 * len(prose))
    prose_train, prose_val = prose[:split], prose[split:]
    log(f"corpus from {sysconfig.get_paths()['stdlib']}: {len(code):,} bytes of code (A), "
        f"{len(prose):,} bytes of docstrings (B); TP={tp} on {'CPU/gloo' if cpu else 'GPU/NCCL'}")

    model = build_model(args, tp)
    train(model, list(model.parameters()), code, args.base_steps, 3e-3, args, "base on A", log)

    cfg = LoRAConfig(rank=args.lora_rank, alpha=2 * args.lora_rank, seed=args.seed)
    apply_lora(model, cfg)
    trainable = sum(p.numel() for p in lora_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    log(f"LoRA r={cfg.rank} on {list(cfg.target_modules)}: {trainable:,} of {total:,} parameters "
        f"trainable on this rank ({100 * trainable / total:.2f}%)")
    train(model, lora_parameters(model), prose_train, args.lora_steps, 3e-3, args, "LoRA on B", log)

    lora_val = evaluate(model, prose_val, args)
    with adapters_disabled(model):
        base_val = evaluate(model, prose_val, args)
    same, total_rep = replicated_factors_identical(model, parallel_state.get_tensor_model_parallel_group())
    log(f"validation loss on B: frozen base {base_val:.4f}  ->  LoRA {lora_val:.4f}")
    log(f"replicated LoRA factors bitwise identical on all {tp} TP ranks: {same}/{total_rep}")
    ok = lora_val < base_val and same == total_rep
    log("demo OK" if ok else "demo FAILED")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
