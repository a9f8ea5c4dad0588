"""The Triton branch kernels compiled for a real GPU (issue 16; the CPU runs them interpreted).

Skipped, with the reason printed, where there is no CUDA device or no triton. Run on a GPU
machine with ``python -m pytest -m gpu tests/gpu -rs``. No Transformer Engine needed.

1. Each kernel, compiled, against float64 and the plain-torch (cuBLAS) path, fp32 and bf16, the
   7B-wide widths included, ranks 1..128; the self-check passes; ``auto`` is plain torch unless
   ``kernels.MEASURED`` has rows for this GPU.
2. A LoRA column and row layer (TP = 1) with ``branch_kernels`` "triton" vs "torch": output and
   every gradient agree to the dtype's rounding.
3. Rows past 2^31 elements (a 4 GiB bf16 view) give plain torch's numbers (64-bit offsets).
4. The dY pass allocates at most dY / 8 beyond its outputs at 16k tokens, width 14336, rank 64.

None of these has run yet: no GPU was available when they were written.
"""

import importlib.util
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

SHAPES = [(4096, 4096, 6144, 16), (4096, 11008, 4096, 16), (1000, 333, 777, 1), (257, 4096, 4096, 128)]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}


@pytest.fixture(scope="module", autouse=True)
def process_group():
    import torch.distributed as dist
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()


def _relative_error(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_compiled_kernels_match_float64_and_cublas(shape, dtype):
    from megatron_lora.core import kernels

    t, k, n, r = shape
    triton_kernels = kernels.select("triton", torch.empty(1, device="cuda"), r)
    assert triton_kernels is not kernels.TorchKernels
    if not any(m.device == torch.cuda.get_device_name() for m in kernels.MEASURED):
        assert kernels.select("auto", torch.empty(1, device="cuda", dtype=dtype), r) is kernels.TorchKernels
    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    x, a, dy, b = rnd(t, k), rnd(r, k), rnd(t, n), rnd(n, r)
    for impl in (triton_kernels, kernels.TorchKernels):
        u = impl.down(x, a)
        grad_u, d_b = impl.dy(dy, b, u, 0.5)
        d_a = impl.up(grad_u, x, 0.5, a)
        refs = dict(u=x.double() @ a.double().t(), g=dy.double() @ b.double(),
                    d_b=0.5 * dy.double().t() @ u.double(), d_a=0.5 * grad_u.double().t() @ x.double())
        for name, got in dict(u=u, g=grad_u, d_b=d_b, d_a=d_a).items():
            error = _relative_error(got, refs[name])
            assert error <= TOLERANCE[dtype], f"{impl.name} {name}: relative error {error:.2e}"


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_with_triton_kernels_matches_torch_kernels(kind, dtype):
    from megatron.core import ModelParallelConfig

    from megatron_lora import LoRAColumnParallelLinear, LoRAConfig, LoRARowParallelLinear

    results = {}
    for mode in ("triton", "torch"):
        torch.manual_seed(0)
        cfg = ModelParallelConfig(params_dtype=dtype)
        cls = LoRAColumnParallelLinear if kind == "column" else LoRARowParallelLinear
        extra = dict(gather_output=False) if kind == "column" else dict(input_is_parallel=True)
        layer = cls(1024, 2048, config=cfg, init_method=torch.nn.init.normal_, bias=False, skip_bias_add=False,
                    lora_config=LoRAConfig(rank=16, alpha=32, branch_kernels=mode),
                    lora_init_name="decoder.layers.0.test", **extra).cuda()
        with torch.no_grad():
            layer.lora_B.normal_()
        layer.weight.requires_grad_(False)
        x = torch.randn(512, 2, 1024, device="cuda", dtype=dtype, requires_grad=True)
        y, _ = layer(x)
        y.backward(torch.randn_like(y))
        results[mode] = (y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)
    for got, ref in zip(results["triton"], results["torch"]):
        error = _relative_error(got, ref.double())
        assert error <= 2 * TOLERANCE[dtype], f"relative error {error:.2e}"


def test_rows_past_two_to_the_31_elements():
    from megatron_lora.core import kernels

    triton_kernels = kernels.select("triton", torch.empty(1, device="cuda"), 16)
    g = torch.Generator(device="cuda").manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
    x = kernels._far_rows(rnd(3, 128))  # row 2 starts 2^31 + 128 elements in
    a, b = rnd(16, 128), rnd(128, 16)
    u = kernels.TorchKernels.down(x, a)
    plan, one = kernels.Plan(64, 1), kernels.Plan(64, 1, kernels.dy_cols(16), 1)
    pairs = [(triton_kernels.down(x, a, plan), u), (triton_kernels.up(u, x, 0.5, a, plan),
                                                   kernels.TorchKernels.up(u, x, 0.5, a))]
    pairs += list(zip(triton_kernels.dy(x, b, u, 0.5, one), kernels.TorchKernels.dy(x, b, u, 0.5)))
    for got, ref in pairs:
        assert _relative_error(got, ref.double()) <= TOLERANCE[torch.bfloat16]


def test_dy_pass_allocates_at_most_an_eighth_of_dy():
    from megatron_lora.core import kernel_plans, kernels

    t, n, r = 16384, 14336, 64
    triton_kernels = kernels.select("triton", torch.empty(1, device="cuda", dtype=torch.bfloat16), r)
    dy = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)
    b, u = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for shape in ((n, r), (t, r)))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    g_out, d_b = triton_kernels.dy(dy, b, u, 0.5)
    torch.cuda.synchronize()
    transient = torch.cuda.max_memory_allocated() - before - g_out.nbytes - d_b.nbytes
    assert transient <= dy.nbytes / 8, (transient, dy.nbytes)
    assert transient >= kernel_plans.plan_dy(t, n, r, 2).transient_bytes  # the plan counts what it allocates
