"""The Triton branch kernels (``megatron_lora.core.triton_branch``) on the CPU, in Triton's interpreter.

1. Each kernel against a float64 reference and against the plain-torch path, on random odd
   shapes, ranks 1..128, fp32 and bf16.
2. Through the LoRA layers (every layer case, SP, dropout) at TP = 1 and 2 with
   ``branch_kernels="triton"``: the unsharded reference, and the plain-torch run of the same cases.
3. ``select``: "auto" is plain torch on the CPU; "triton" without a way to run fails in one line.

Triton comes with torch's CUDA build (the Python 3.12 job); where it does not import the module
is skipped with that reason.
"""

import pytest
import torch

from megatron_lora import LoRAConfig
from megatron_lora.core import kernels
from tests.distributed import layer_cases as L
from tests.distributed.launcher import run_distributed
from tests.distributed.shapes import RANK


MISSING = kernels.triton_missing_reason()
needs_triton = pytest.mark.skipif(MISSING is not None, reason=f"needs triton: {MISSING}")

# (tokens, in, out, rank): odd sizes, a partial block everywhere, ranks 1..128; the last one
# splits every reduction into spans (K > 512 for down, T > 512 for up, T > 1024 for the dY pass).
SHAPES = [(37, 53, 29, 1), (64, 64, 64, 16), (5, 130, 70, 128), (100, 33, 47, 3), (129, 96, 65, 64),
          (1100, 600, 300, 8)]
# One bf16 rounding of the output (2^-8) plus fp32-accumulation order; fp32: summation order.
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2 ** -7}


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _interpreted_kernels():
    """In a spawned rank, whose TRITON_INTERPRET=1 was set before anything imported triton (its
    own library functions are compiled or interpreted from the moment triton is imported)."""
    from megatron_lora.core import triton_branch

    assert triton_branch.INTERPRETED, "TRITON_INTERPRET was not set when triton_branch was imported"
    return kernels.select("triton", torch.empty(1), 4)


def worker_kernel_errors(shapes, dtypes):
    """Relative error of every product, Triton and plain torch, against float64."""
    triton_kernels, errors = _interpreted_kernels(), {}
    for shape in shapes:
        t, k, n, r = shape
        g = torch.Generator().manual_seed(sum(shape))
        for dtype in dtypes:
            rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
            x, a, dy, b = rnd(t, k), rnd(r, k), rnd(t, n), rnd(n, r)
            s = 0.75
            for impl in (triton_kernels, kernels.TorchKernels):
                u = impl.down(x, a)
                grad_u, d_b = impl.dy(dy, b, u, s)
                d_a = impl.up(grad_u, x, s, a)
                refs = dict(u=x.double() @ a.double().t(), g=dy.double() @ b.double(),
                            d_b=s * dy.double().t() @ u.double(), d_a=s * grad_u.double().t() @ x.double())
                for name, got in dict(u=u, g=grad_u, d_b=d_b, d_a=d_a).items():
                    assert got.dtype == dtype and got.shape == refs[name].shape, (name, got.dtype, got.shape)
                    errors[(shape, str(dtype), impl.name, name)] = _relative_error(got, refs[name])
    return errors


def worker_strided_and_deterministic():
    triton_kernels, ref = _interpreted_kernels(), kernels.TorchKernels
    triton_kernels.SPAN, triton_kernels.DY_SPAN = 64, 128  # many spans, a partial last one
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(7, 3, 40, generator=g)
    x = wide[..., :33]  # an [s, b, h] view with row stride 40: taken without a copy
    a, dy, b = torch.randn(5, 33, generator=g), torch.randn(7, 3, 18, generator=g), torch.randn(18, 5, generator=g)
    u = ref.down(x, a)
    pairs = [(triton_kernels.down(x, a), u)]
    pairs += list(zip(triton_kernels.dy(dy, b, u, 2.0), ref.dy(dy, b, u, 2.0)))
    dy2, b2, u2 = torch.randn(200, 70, generator=g), torch.randn(70, 8, generator=g), torch.randn(200, 8, generator=g)
    first, second = triton_kernels.dy(dy2, b2, u2, 0.5), triton_kernels.dy(dy2, b2, u2, 0.5)
    return pairs, all(torch.equal(p, q) for p, q in zip(first, second))


def worker_auto_check():
    """``auto``'s one-time check: passes for the real kernels, fails (warning, plain torch) for a
    broken one."""
    from megatron_lora.core import triton_branch

    _interpreted_kernels()
    passes = all(kernels.triton_agrees(dtype, "cpu", block) for dtype in (torch.float32, torch.bfloat16)
                 for block in (16, 128))
    triton_branch.TritonKernels.down = staticmethod(lambda x, a: torch.zeros(*x.shape[:-1], a.shape[0]))
    return passes, kernels.triton_agrees(torch.float32, "cpu", 32)


@needs_triton
def test_auto_checks_the_kernels_once_and_falls_back_to_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    [(real, broken)] = run_distributed(worker_auto_check, 1, fresh=True)
    assert real and not broken


@needs_triton
def test_kernels_match_float64(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the fresh rank starts with it
    dtypes = (torch.float32, torch.bfloat16)
    [errors] = run_distributed(worker_kernel_errors, 1, SHAPES, dtypes, fresh=True)
    assert len(errors) == len(SHAPES) * len(dtypes) * 2 * 4
    bad = {key: f"{error:.2e}" for key, error in errors.items() if error > TOLERANCE[getattr(torch, key[1][6:])]}
    assert not bad, f"relative errors over tolerance: {bad}"


@needs_triton
def test_kernels_take_strided_batched_inputs_and_are_deterministic(monkeypatch):
    """[s, b, h] inputs and a row-strided view give the plain-torch numbers; two runs of the dY
    kernel give the same bits (no atomics: a replicated factor's gradient must agree across ranks)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    [(pairs, deterministic)] = run_distributed(worker_strided_and_deterministic, 1, fresh=True)
    for got, ref in pairs:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    assert deterministic


CASES = L.all_cases()
DROPOUT_CASES = [L.Case("column", dropout=0.5), L.Case("column", sp=True, dropout=0.5),
                 L.Case("row", dropout=0.5), L.Case("row", sp=True, dropout=0.5)]
T = L.logical_tensors()


def _run(tp, kernels_mode, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the fresh ranks start with it
    cfg = LoRAConfig(rank=RANK, alpha=8, dropout=0.5, branch_kernels=kernels_mode)
    return run_distributed(L.worker_all_cases, tp, CASES + DROPOUT_CASES, T, cfg, tp=tp, fresh=True)


@needs_triton
@pytest.mark.parametrize("tp", [1, 2])
def test_layers_with_triton_kernels_match_reference_and_torch_path(tp, monkeypatch):
    triton_run, torch_run = _run(tp, "triton", monkeypatch), _run(tp, "torch", monkeypatch)
    scaling = LoRAConfig(rank=RANK, alpha=8).scaling
    for index, case in enumerate(CASES + DROPOUT_CASES):
        got = L.assemble(case, [r[index] for r in triton_run])
        L.assert_matches(got, L.assemble(case, [r[index] for r in torch_run]), label=f"{case} vs torch: ")
        if not case.dropout:  # the dropout cases' reference mask is checked by test_layers_match_unsharded
            L.assert_matches(got, L.reference(case, T, scaling), label=f"{case}: ")
        assert all(r[index]["weight_grad"] is None for r in triton_run)


def test_auto_is_plain_torch_on_the_cpu():
    assert kernels.select("auto", torch.empty(1), 4) is kernels.TorchKernels
    assert kernels.select("torch", torch.empty(1), 4) is kernels.TorchKernels


def test_forcing_triton_without_a_way_to_run_it_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="branch_kernels='triton'.*(TRITON_INTERPRET=1|triton does not import)"):
        kernels.select("triton", torch.empty(1), 4)


def test_unknown_mode_is_refused_by_the_config():
    with pytest.raises(ValueError, match="branch_kernels must be one of"):
        LoRAConfig(branch_kernels="cuda")
