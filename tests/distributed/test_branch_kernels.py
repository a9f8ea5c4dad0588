"""The branch kernels: the Triton ones on the CPU in Triton's interpreter, and how they are chosen.

1. Each kernel against a float64 reference and against the plain-torch path, on random odd
   shapes, ranks 1..128, fp32 and bf16; rows at offsets past 2^31 elements (64-bit offsets).
2. Determinism by construction (no atomics, fixed spans, partials added in a fixed order), a test
   that fails when any of the three is broken (see its docstring for why the old one could not).
3. Bounded partials: the plans' fp32 transients for ranks 1..256 at representative shapes, and
   what the launchers really allocate.
4. The self-check: passes for the kernels, fails for a broken multi-span sum.
5. One choice per model-parallel group: at TP=2 one rank fails its self-check, both run plain
   torch and the replicated factors' gradients are bitwise equal (without the agreement they are not).
6. Through the LoRA layers (every layer case, SP, dropout) at TP = 1 and 2 with
   ``branch_kernels="triton"``: the unsharded reference, and the plain-torch run of the same cases.
7. ``select``: "auto" is plain torch (no measurement exists); "triton" without a way to run fails
   in one line; the measured-shape lookup.

Triton comes with torch's CUDA build (the Python 3.12 job); where it does not import, the tests
that run kernels are skipped with that reason (the planning and selection tests still run).
"""

import contextlib
import re

import pytest
import torch

from megatron_lora import LoRAConfig
from megatron_lora.core import kernel_plans, kernels
from tests.distributed import layer_cases as L
from tests.distributed.launcher import run_distributed
from tests.distributed.shapes import RANK


MISSING = kernels.triton_missing_reason()
needs_triton = pytest.mark.skipif(MISSING is not None, reason=f"needs triton: {MISSING}")

# (tokens, in, out, rank): odd sizes, a partial block everywhere, ranks 1..128; the last one
# splits the reductions into spans by the plans (down: 2 spans of K, dY: 2 token spans and a
# column span of two blocks, up: 3 token spans).
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
    return triton_branch.TritonKernels


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


@needs_triton
def test_kernels_match_float64(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the fresh rank starts with it
    dtypes = (torch.float32, torch.bfloat16)
    [errors] = run_distributed(worker_kernel_errors, 1, SHAPES, dtypes, fresh=True)
    assert len(errors) == len(SHAPES) * len(dtypes) * 2 * 4
    bad = {key: f"{error:.2e}" for key, error in errors.items() if error > TOLERANCE[getattr(torch, key[1][6:])]}
    assert not bad, f"relative errors over tolerance: {bad}"


def worker_strided_and_far_rows():
    """(Triton, torch) pairs: an [s, b, h] view with row stride 40, and rows 2^30 + 64 elements
    apart, so that row 2 sits past 2^31 elements (int32 offsets would wrap there)."""
    triton_kernels, ref, plan = _interpreted_kernels(), kernels.TorchKernels, kernels.Plan
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, 40, generator=g)[..., :33]  # taken without a copy
    a, dy, b = torch.randn(5, 33, generator=g), torch.randn(7, 3, 18, generator=g), torch.randn(18, 5, generator=g)
    u = ref.down(x, a)
    pairs = [(triton_kernels.down(x, a, plan(64, 1)), u)]
    pairs += list(zip(triton_kernels.dy(dy, b, u, 2.0, plan(64, 1, 256, 1)), ref.dy(dy, b, u, 2.0)))
    far_x = kernels._far_rows(torch.randn(3, 40, generator=g))
    far_dy = kernels._far_rows(torch.randn(3, 24, generator=g))
    assert far_x.stride(0) * 2 >= 2 ** 31 > far_x.stride(0)  # a stride that fits int32, an offset that does not
    a, b = torch.randn(9, 40, generator=g), torch.randn(24, 9, generator=g)
    u = ref.down(far_x, a)
    far = [(triton_kernels.down(far_x, a, plan(64, 1)), u)]
    far += list(zip(triton_kernels.dy(far_dy, b, u, 0.5, plan(64, 1, 256, 1)), ref.dy(far_dy, b, u, 0.5)))
    far.append((triton_kernels.up(u, far_x, 0.5, a, plan(64, 1)), ref.up(u, far_x, 0.5, a)))
    return pairs, far


@needs_triton
def test_kernels_take_strided_inputs_and_rows_past_two_to_the_31(monkeypatch):
    """Before 64-bit offsets the far rows were read from a wrapped (negative) offset: the rank
    crashed (segmentation fault) or, where that memory was mapped, returned wrong numbers."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    [(pairs, far)] = run_distributed(worker_strided_and_far_rows, 1, fresh=True)
    for got, ref in pairs + far:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)


def test_every_kernel_index_is_64_bit():
    """Every program id and ``tl.arange`` in the kernels is widened to int64 before use (the
    interpreter test above covers the strided rows; this covers e.g. ``program_id * T * R``)."""
    source = _kernel_source()
    ids, aranges = re.findall(r"tl\.program_id\(\d\)(\S*)", source), re.findall(r"tl\.arange\(0, (\w+)\)(\S*)", source)
    assert len(ids) == 6 and all(tail.startswith(".to(tl.int64)") for tail in ids), ids
    # The rank index (< BR <= 256) only meets R, K or stride_a, whose products stay below r * K.
    wide = [name for name, tail in aranges if tail.startswith(".to(tl.int64)")]
    narrow = [name for name, tail in aranges if not tail.startswith(".to(tl.int64)")]
    assert set(narrow) <= {"BR", "BT", "BK"} and "BN" in wide, (wide, narrow)
    for line in source.splitlines():  # the narrow token / column aranges are added to an int64 pid term
        if "tl.arange(0, BT)" in line and ".to(tl.int64)" not in line or "tl.arange(0, BK)" in line and \
                ".to(tl.int64)" not in line:
            assert re.search(r"pid_\w \* B[TK] \+ tl\.arange", line), line


def _kernel_source() -> str:
    """The Triton kernels' source text (triton_branch.py up to its launchers), read without importing
    triton."""
    import importlib.util

    spec = importlib.util.find_spec("megatron_lora.core.triton_branch")
    with open(spec.origin) as f:
        text = f.read()
    return text[text.index("@triton.jit"):text.index("def flat_unit_stride(")]


def test_kernels_have_no_atomics_and_no_cross_program_reads():
    """Part one of determinism by construction: an atomic add would sum in whatever order the GPU
    runs programs, which Triton's interpreter (one program at a time) can never show."""
    source = _kernel_source()
    assert "atomic" not in source and "tl.debug_barrier()" in source
    # The only load of a buffer the kernels write is dY's g partial, at the program's own rows
    # (pid_n's slice): no program reads another's output.
    assert re.findall(r"tl\.load\((g_ptrs)", source) == ["g_ptrs"]
    assert "g_ptrs = g_part_ptr + pid_n * T * R + rt[:, None] * R + rr[None, :]" in source


def worker_partials_in_index_order():
    """Each launcher's partials and result, with the launchers' own allocations recorded."""
    from megatron_lora.core import triton_branch

    triton_kernels, allocated = _interpreted_kernels(), []
    real = triton_branch.partials

    def recording(*shape, device):
        allocated.append(real(*shape, device=device))
        return allocated[-1]

    triton_branch.partials = recording
    g = torch.Generator().manual_seed(5)
    x, a = torch.randn(300, 200, generator=g), torch.randn(6, 200, generator=g)
    dy, b = torch.randn(300, 90, generator=g), torch.randn(90, 6, generator=g)
    u = triton_kernels.down(x, a, kernels.Plan(64, 4))
    g_out, d_b = triton_kernels.dy(dy, b, u, 0.5, kernels.Plan(64, 5, 256, 1))
    d_a = triton_kernels.up(g_out, x, 0.5, a, kernels.Plan(64, 5))
    return [p.clone() for p in allocated], dict(u=u, g=g_out, d_b=d_b, d_a=d_a), dict(x=x, a=a, dy=dy, b=b)


@needs_triton
def test_partials_are_fixed_spans_added_in_index_order(monkeypatch):
    """Part two of determinism by construction. The old test ran the dY kernel twice in the
    interpreter and compared bits; programs run one at a time there, so no scheduling order can
    differ and it could not fail. This one fails if a partial is not its span's product (spans that
    depend on anything but the shape), or if the result is not torch's sum of the partials over
    the span axis (one fixed order): the reversed order gives other bits on this data (asserted),
    so a combination whose order depended on scheduling would show."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    [(parts, out, t)] = run_distributed(worker_partials_in_index_order, 1, fresh=True)
    down_parts, g_parts, db_parts, up_parts = parts
    x, a, dy, b = (t[k].double() for k in "x a dy b".split())
    assert [p.shape for p in parts] == [(4, 300, 6), (1, 300, 6), (5, 90, 6), (5, 6, 200)]
    spans = [slice(i, i + 64) for i in range(0, 300, 64)]
    for i, s in enumerate(spans[:4]):  # K = 200: spans 0-63, 64-127, 128-191, 192-199
        assert _relative_error(down_parts[i], x[:, s] @ a[:, s].t()) < 1e-6, i
    u, g_out = out["u"].double(), out["g"].double()
    for i, s in enumerate(spans):  # T = 300: five token spans
        assert _relative_error(db_parts[i], 0.5 * dy[s].t() @ u[s]) < 1e-6, i
        assert _relative_error(up_parts[i], 0.5 * g_out[s].t() @ x[s]) < 1e-6, i
    assert torch.equal(g_parts[0], out["g"])  # one column span: its partial is g itself
    reordered_differs = False
    for name, p in (("u", down_parts), ("d_b", db_parts), ("d_a", up_parts)):
        assert torch.equal(out[name], p.sum(0)), name  # the launcher's fixed order
        reordered_differs |= not torch.equal(out[name], p.flip(0).sum(0))
    assert reordered_differs, "the data does not tell summation orders apart: the test would not bite"


SCALE_TOKENS = (1, 64, 4096, 32768)
# Widths of one rank's activation: Llama-2-7B / 3-8B / 70B hidden, fc1 (gated, TP=1 and TP=8), fc2,
# qkv at TP=8, and tiny ones.
SCALE_WIDTHS = (64, 896, 1024, 4096, 8192, 22016, 28672, 57344 // 8, 57344)


def test_partials_stay_within_an_eighth_of_the_activation_at_every_rank_up_to_256():
    """What the launchers would allocate (fp32 partials plus their sum), from the planning functions
    the launchers call. Before: the dY pass kept one fp32 [T, r] partial per 32-256 columns,
    2r/cols of dY's bytes (2x dY at r = 64: 7.5 GB at 32k tokens of Llama-70B's gated fc1)."""
    checked = used = 0
    for itemsize in (2, 4):
        for tokens in SCALE_TOKENS:
            for width in SCALE_WIDTHS:
                bound = tokens * width * itemsize / kernel_plans.PARTIAL_FRACTION
                for rank in range(1, 257):
                    for plan in (kernel_plans.plan_down(tokens, width, rank, itemsize),
                                 kernel_plans.plan_up(tokens, width, rank, itemsize),
                                 kernel_plans.plan_dy(tokens, width, rank, itemsize)):
                        checked += 1
                        if plan is not None:  # None: that product runs in plain torch
                            used += 1
                            assert plan.transient_bytes <= bound, (itemsize, tokens, width, rank, plan)
    assert checked == 2 * 4 * 9 * 256 * 3 and used > checked // 2
    # The kernels are still used where most of a LoRA run lives: bf16, 4k tokens, r <= 64, widths
    # >= 4096 (a narrow dY, e.g. 896 columns at r = 32, leaves no room for a fp32 [T, r] g: torch).
    for width in SCALE_WIDTHS[3:]:
        for rank in (8, 16, 32, 64):
            plans = [f(4096, width, rank, 2)
                     for f in (kernel_plans.plan_down, kernel_plans.plan_up, kernel_plans.plan_dy)]
            assert None not in plans, (width, rank, plans)
    dy_bytes = 32768 * 57344 * 2  # Llama-70B's gated fc1 output gradient at TP=1, 32k tokens, bf16
    old_dy_partials = 32768 * (-(-57344 // kernels.dy_cols(64))) * 64 * 4  # one [T, r] per 256 columns
    assert old_dy_partials == 2 * dy_bytes
    assert 8 * kernel_plans.plan_dy(32768, 57344, 64, 2).transient_bytes <= dy_bytes


def worker_default_plan_allocations(t, k, n, r):
    """The shapes of the partial buffers each launcher allocates with its default plan."""
    from megatron_lora.core import triton_branch

    triton_kernels, allocated = _interpreted_kernels(), {}
    real = triton_branch.partials
    g = torch.Generator().manual_seed(9)
    x, a, dy, b = (torch.randn(*s, generator=g) for s in ((t, k), (r, k), (t, n), (n, r)))
    for product, call in (("down", lambda: triton_kernels.down(x, a)),
                          ("dy", lambda: triton_kernels.dy(dy, b, torch.randn(t, r, generator=g), 0.5)),
                          ("up", lambda: triton_kernels.up(torch.randn(t, r, generator=g), x, 0.5, a))):
        shapes = allocated[product] = []
        triton_branch.partials = lambda *shape, device: shapes.append(shape) or real(*shape, device=device)
        call()
    return allocated


@needs_triton
def test_launchers_allocate_what_the_plans_count(monkeypatch):
    """fp32 partial buffers (plus one more of the same size for torch's sum when a reduction has
    several spans) are exactly the plan's ``transient_bytes``, within the bound."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    t, k, n, r = 1100, 600, 300, 8
    [allocated] = run_distributed(worker_default_plan_allocations, 1, t, k, n, r, fresh=True)
    plans = dict(down=kernel_plans.plan_down(t, k, r, 4), dy=kernel_plans.plan_dy(t, n, r, 4),
                 up=kernel_plans.plan_up(t, k, r, 4))
    assert allocated == dict(down=[(2, t, r)], dy=[(1, t, r), (2, n, r)], up=[(3, r, k)])  # several spans
    for product, shapes in allocated.items():
        counted = sum(4 * (s[0] + (s[0] > 1)) * s[1] * s[2] for s in shapes)
        assert counted == plans[product].transient_bytes <= t * (n if product == "dy" else k) * 4 / 8, product


def worker_self_check():
    """The real kernels pass the check; a launcher that drops every partial but the first (correct
    on one span) fails it, because the check runs several spans."""
    from megatron_lora.core import triton_branch

    _interpreted_kernels()
    passes = all(kernels.triton_agrees(dtype, "cpu", block) for dtype in (torch.float32, torch.bfloat16)
                 for block in (16, 128))
    triton_branch.ordered_sum = lambda parts: parts[0]
    return passes, kernels.triton_agrees(torch.float32, "cpu", 32)


@needs_triton
def test_self_check_passes_for_the_kernels_and_fails_for_a_broken_span_sum(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    [(real, broken)] = run_distributed(worker_self_check, 1, fresh=True)
    assert real and not broken


@contextlib.contextmanager
def tiny_layers_run_the_kernels():
    """The test layers (16 -> 24 features, r = 4) are too narrow for the fp32 partials to fit in an
    eighth of their activations, so every product would run in plain torch; here the partials may be
    as large as the activation, so that the layers really run the kernels (the bound itself is
    tested above, at the shapes it is for)."""
    kernel_plans.PARTIAL_FRACTION = 1
    yield


def _long_tensors():
    """``L.logical_tensors`` with 320 tokens, so that the kernels' token tiles and torch's GEMM add
    in different orders (at 16 tokens both give the same bits)."""
    g = torch.Generator().manual_seed(11)
    t = L.logical_tensors()
    return dict(t, x=torch.randn(160, 2, t["x"].shape[-1], generator=g), dy=torch.randn(160, 2, t["dy"].shape[-1],
                                                                                        generator=g))


def worker_one_rank_fails_its_check(fail_rank: int, agreement: bool):
    """Column and row layer (TP=2, no SP) with branch_kernels="triton"; rank ``fail_rank``'s down
    kernel is broken, so its self-check fails. Returns what each rank chose and the replicated
    factors' gradients (column: lora_A, row: lora_B)."""
    from megatron_lora.core import triton_branch
    from tests.distributed.models import tp_rank

    _interpreted_kernels()
    if tp_rank()[1] == fail_rank:
        triton_branch.TritonKernels.down = staticmethod(lambda x, a, plan=None: torch.zeros(*x.shape[:-1], len(a)))
    if not agreement:
        kernels.agree = lambda flags, group, device: tuple(flags)
    t, cfg = _long_tensors(), LoRAConfig(rank=RANK, alpha=8, branch_kernels="triton")
    with tiny_layers_run_the_kernels():
        column, row = (L.run_case(L.Case(kind), t, cfg) for kind in ("column", "row"))
    chosen = sorted({"triton" if passed else "torch" for (_, _, _, group, _), (_, passed, _) in
                     kernels._AGREED.items() if group is not None})
    return chosen, column["dA"], row["dB"]


@needs_triton
def test_one_rank_failing_its_check_puts_the_whole_group_on_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    agreed = run_distributed(worker_one_rank_fails_its_check, 2, 1, True, tp=2, fresh=True)
    assert [chosen for chosen, _, _ in agreed] == [["torch"], ["torch"]]
    (_, col_a0, row_b0), (_, col_a1, row_b1) = agreed
    assert torch.equal(col_a0, col_a1) and torch.equal(row_b0, row_b1)
    torch_run = run_distributed(L.worker_all_cases, 2, [L.Case("column"), L.Case("row")], _long_tensors(),
                                LoRAConfig(rank=RANK, alpha=8, branch_kernels="torch"), tp=2)
    assert torch.equal(col_a0, torch_run[0][0]["dA"]) and torch.equal(row_b0, torch_run[0][1]["dB"])
    # Without the agreement (each rank on its own check) the ranks choose differently and the
    # replicated gradients differ in bits: what this test exists to catch.
    alone = run_distributed(worker_one_rank_fails_its_check, 2, 1, False, tp=2, fresh=True)
    assert [chosen for chosen, _, _ in alone] == [["triton"], ["torch"]]
    (_, col_a0, row_b0), (_, col_a1, row_b1) = alone
    assert not (torch.equal(col_a0, col_a1) and torch.equal(row_b0, row_b1))


CASES = L.all_cases()
DROPOUT_CASES = [L.Case("column", dropout=0.5), L.Case("column", sp=True, dropout=0.5),
                 L.Case("row", dropout=0.5), L.Case("row", sp=True, dropout=0.5)]
T = L.logical_tensors()


def _run(tp, kernels_mode, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the fresh ranks start with it
    cfg = LoRAConfig(rank=RANK, alpha=8, dropout=0.5, branch_kernels=kernels_mode)
    return run_distributed(L.worker_all_cases, tp, CASES + DROPOUT_CASES, T, cfg, tiny_layers_run_the_kernels, tp=tp,
                           fresh=True)


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


def test_auto_is_plain_torch_without_a_measurement():
    assert kernels.MEASURED == ()  # no GPU benchmark row exists: auto is plain torch on every device
    assert kernels.select("auto", torch.empty(1), 4) is kernels.TorchKernels
    assert kernels.select("torch", torch.empty(1), 4) is kernels.TorchKernels


def test_auto_follows_the_nearest_measured_shape():
    row = dict(device="NVIDIA H100 80GB HBM3", date="2026-12-05", product="dy", dtype="bfloat16", rank=16,
               width=4096)
    table = (kernels.Measurement(**row, tokens=4096, torch_us=100.0, triton_us=80.0),
             kernels.Measurement(**row, tokens=16384, torch_us=300.0, triton_us=320.0))
    pick = lambda **kw: kernels.measured_winner(**{**dict(product="dy", device=row["device"],  # noqa: E731
                                                         dtype=torch.bfloat16, rank=16, width=4096), **kw},
                                                table=table)
    assert pick(tokens=4096) == pick(tokens=6000) == "triton"
    assert pick(tokens=12000) == pick(tokens=32768) == "torch"
    assert pick(tokens=1000) == "torch"  # more than a factor 2 from any measurement
    for other in (dict(tokens=4096, rank=32), dict(tokens=4096, width=4095), dict(tokens=4096, product="up"),
                  dict(tokens=4096, dtype=torch.float32), dict(tokens=4096, device="NVIDIA H200")):
        assert pick(**other) == "torch", other


def test_forcing_triton_without_a_way_to_run_it_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="branch_kernels='triton'.*(TRITON_INTERPRET=1|triton does not import)"):
        kernels.select("triton", torch.empty(1), 4)


def test_unknown_mode_is_refused_by_the_config():
    with pytest.raises(ValueError, match="branch_kernels must be one of"):
        LoRAConfig(branch_kernels="cuda")
