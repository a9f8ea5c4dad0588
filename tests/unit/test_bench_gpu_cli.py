"""``benchmarks/bench_gpu.py`` without a GPU: the CPU smoke run, the no-GPU error, and its SDPA core
attention against Megatron's own local ``DotProductAttention``.

The script runs in subprocesses (its gloo group and Megatron's parallel state stay out of the
pytest process); the attention comparison runs on one gloo rank of ``tests.distributed.launcher``.
"""

import json
import os
import subprocess
import sys

import torch

from megatron_lora.core import kernels
from tests import REPO_ROOT
from tests.distributed.launcher import run_distributed

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "bench_gpu.py")
TINY = ["--hidden", "64", "--heads", "4", "--groups", "2", "--ffn", "128", "--layers", "2", "--vocab", "128",
        "--seq", "32", "--micro-batch", "2", "--rank", "4", "--reps", "1", "--iters", "1", "--warmup", "1"]
VARIANTS = {"frozen", "lora", "lora_triton_kernels", "lora_recompute", "separate_branch"}
MOE = ["--num-experts", "8", "--moe-topk", "2", "--moe-ffn", "32"]


def _adapter_params(rank, moe):
    """LoRA parameters of TINY (2 layers, hidden 64, 4 heads / 2 groups of 16, SwiGLU): r x (in + out)
    per adapted linear; with ``MOE``, every one of the 8 experts' fc1 (64 -> 2 x 32) and fc2 (32 -> 64)."""
    attention = rank * (64 + (4 + 2 * 2) * 16) + rank * (64 + 64)
    mlp = 8 * (rank * (64 + 2 * 32) + rank * (32 + 64)) if moe else rank * (64 + 2 * 128) + rank * (128 + 64)
    return 2 * (attention + mlp)


def test_cpu_smoke_run_appends_one_json_line(tmp_path):
    out_file = tmp_path / "bench.jsonl"
    out_file.write_text('{"earlier": "run"}\n')  # appended to, never overwritten
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the Triton variant cannot run
    run = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--dtype", "fp32", *TINY,
                          "--json", str(out_file)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = out_file.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"earlier": "run"}
    result = json.loads(lines[1])
    assert lines[1] in run.stdout.splitlines()  # the same line on stdout, after the table
    assert "| separate_branch |" in run.stdout
    assert {"bench", "date", "device", "torch", "megatron_core", "core_attention", "config",
            "variants"} <= set(result)
    assert result["core_attention"] == "sdpa" and result["config"]["hidden"] == 64
    assert set(result["variants"]) == VARIANTS - {"lora_triton_kernels"}
    assert result["skipped"] == {"lora_triton_kernels": kernels.triton_missing_reason()
                                 or "CPU without TRITON_INTERPRET=1"}
    for row in result["variants"].values():
        assert row["tokens_per_s"] > 0 and row["activation_peak_gib"] is None  # no allocator stats on CPU
        assert {"tokens_per_s_vs_frozen", "activation_peak_vs_frozen", "initial_loss"} <= set(row)
    assert result["variants"]["frozen"]["tokens_per_s_vs_frozen"] == 1.0
    trainable = {name: row["trainable_params"] for name, row in result["variants"].items()}
    assert trainable == dict(frozen=0, lora=_adapter_params(4, False), lora_recompute=_adapter_params(4, False),
                             separate_branch=_adapter_params(4, False)), trainable


def test_cpu_smoke_run_of_the_moe_shape():
    """``--num-experts 8 --moe-topk 2``: Megatron's MoE layer (SequentialMLP experts) in every
    variant, whose initial losses the script checks against the frozen MoE model's (same router,
    same experts, B = 0); LoRA adapts every expert's linear_fc1 / linear_fc2."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--dtype", "fp32", *TINY, *MOE],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert "MoE: 8 SequentialMLP experts of ffn 32, top-2" in run.stdout
    assert (result["config"]["num_experts"], result["config"]["moe_topk"], result["config"]["moe_ffn"]) == (8, 2, 32)
    assert set(result["variants"]) == VARIANTS - {"lora_triton_kernels"}
    for row in result["variants"].values():
        assert row["tokens_per_s"] > 0 and row["initial_token_loss_max_diff"] <= 1e-3
    trainable = {name: row["trainable_params"] for name, row in result["variants"].items()}
    assert trainable == dict(frozen=0, lora=_adapter_params(4, True), lora_recompute=_adapter_params(4, True),
                             separate_branch=_adapter_params(4, True)), trainable


def test_cuda_without_a_gpu_is_one_error_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, SCRIPT, *TINY], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert run.stdout == "" and len(run.stderr.splitlines()) == 1, run.stderr
    assert run.stderr.startswith("error: bench_gpu.py --device cuda needs a CUDA GPU")


def test_kernel_table_prints_measurement_rows_auto_can_read():
    """``--kernel-table`` on the CPU (Triton's interpreter where triton imports; else one error line):
    each printed row is a ``kernels.Measurement`` for one product at one of the targets' widths."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    tiny = ["--hidden", "64", "--heads", "4", "--groups", "2", "--ffn", "96", "--seq", "40", "--rank", "4",
            "--reps", "1", "--iters", "1", "--warmup", "0"]
    run = subprocess.run([sys.executable, SCRIPT, "--kernel-table", "--device", "cpu", "--dtype", "fp32", *tiny],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    missing = kernels.triton_missing_reason()
    if missing:
        assert run.returncode == 2 and run.stdout == "", (run.returncode, run.stdout, run.stderr)
        assert run.stderr.strip() == f"error: --kernel-table needs the Triton kernels to run here: {missing}."
        return
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    rows = [kernels.Measurement(**row) for row in json.loads(lines[-1])["rows"]]
    assert lines[:-1] == [f"    {row!r}," for row in rows]  # lines to paste into kernels.MEASURED
    # widths: qkv / proj / fc1 in 64, fc2 in 96; outputs 128 (qkv: 4 + 2 * 2 heads of 16), 64, 192 (gated)
    assert sorted((r.product, r.width) for r in rows) == [("down", 64), ("down", 96), ("dy", 64), ("dy", 128),
                                                         ("dy", 192), ("up", 64), ("up", 96)]
    assert all((r.device, r.dtype, r.rank, r.tokens) == ("cpu", "float32", 4, 40) for r in rows)
    assert all(r.torch_us > 0 and r.triton_us > 0 for r in rows)


def _sdpa_vs_megatron(heads, groups):
    """Max |difference| of output and q/k/v gradients, SDPAttention vs Megatron's local one."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from benchmarks.bench_gpu import SDPAttention
    from tests.distributed.models import tiny_gpt_config

    config = tiny_gpt_config(hidden_size=16 * heads, num_attention_heads=heads, num_query_groups=groups)
    kw = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    s, b, d = 12, 2, 16
    torch.manual_seed(0)
    q, k, v = (torch.randn(s, b, n, d) for n in (heads, groups, groups))
    outs, grads = [], []
    for module in (SDPAttention(**kw), DotProductAttention(**kw)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = module(*leaves, None, attn_mask_type=AttnMaskType.causal)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        outs.append(out.detach())
        grads.append([t.grad for t in leaves])
    assert outs[0].shape == (s, b, heads * d)
    return [(outs[0] - outs[1]).abs().max().item()] + [(x - y).abs().max().item() for x, y in zip(*grads)]


def test_sdpa_core_attention_equals_megatrons_local_one_on_a_causal_gqa_case():
    diffs = run_distributed(_sdpa_vs_megatron, 1, 4, 2)[0]
    assert max(diffs) < 1e-5, diffs
