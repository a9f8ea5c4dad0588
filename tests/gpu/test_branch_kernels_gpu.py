"""The Triton branch kernels compiled for a real GPU (issue 16; the CPU runs them interpreted).

Skipped, with the reason printed, where there is no CUDA device or no triton. Run on a GPU
machine with ``python -m pytest -m gpu tests/gpu -rs``. No Transformer Engine needed.

1. Each kernel, compiled, against float64 and the plain-torch (cuBLAS) path, fp32 and bf16, the
   7B-wide widths included, ranks 1..128; and ``auto``'s one-time check passes (so ``auto``
   really runs Triton here).
2. A LoRA column and row layer (TP = 1) with ``branch_kernels`` "triton" vs "torch": output and
   every gradient agree to the dtype's rounding.
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
    assert kernels.select("auto", torch.empty(1, device="cuda", dtype=dtype), r) is triton_kernels
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
