"""``megatron_lora.cpu``: the CPU shim that lets Megatron-Core run without CUDA.

``enable_cpu()`` is process-global and idempotent; these tests enable it in the pytest process
(other tests on a CUDA-less host run Megatron under it too). The "no-op when CUDA is present" case
needs an untouched interpreter, so it runs in a subprocess, and it is the one test that also runs
on a CUDA host.
"""

import json
import subprocess
import sys

import pytest
import torch
from megatron.core.tensor_parallel import random as mrandom
from torch.overrides import _get_current_function_mode_stack

from megatron_lora import cpu
from tests import REPO_ROOT

MODEL_PARALLEL_RNG = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME
CUDA_SPELLINGS = ["cuda", "cuda:0", torch.device("cuda"), torch.device("cuda", 0), 0]


@pytest.fixture(autouse=True)
def cpu_mode(request):
    """The shim on in this process; on a CUDA host only the (subprocess) no-op test runs."""
    if request.function is test_enable_cpu_is_noop_when_cuda_is_available:
        return
    if not cpu.enable_cpu():
        pytest.skip("CUDA is available: the CPU shim stays off")


def _shim_modes():
    return [m for m in _get_current_function_mode_stack() if isinstance(m, cpu._CudaToCpuMode)]


def _seed_tracker(seed, **kwargs):
    # Explicit ranks: no parallel_state needed in a single process.
    mrandom.model_parallel_cuda_manual_seed(seed, tp_rank=0, ep_rank=0, etp_rank=0, **kwargs)
    return mrandom.get_cuda_rng_tracker()


def test_enable_cpu_is_idempotent():
    patched = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.manual_seed)
    assert cpu.enable_cpu() is True and cpu.enable_cpu() is True
    assert len(_shim_modes()) == 1, "a second call must not push a second mode"
    assert (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.manual_seed) == patched
    assert cpu.is_cpu_mode()


def test_enable_cpu_is_noop_when_cuda_is_available():
    script = """
import json, torch
torch.cuda.is_available = lambda: True  # pretend to be a CUDA host
from megatron.core.tensor_parallel import random as mrandom
from torch.overrides import _get_current_function_mode_stack
def patchable():
    return (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.manual_seed,
            mrandom.CudaRNGStatesTracker, mrandom._CUDA_RNG_STATE_TRACKER,
            mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state,
            torch.cuda.current_stream, torch.cuda.default_stream, torch.cuda.Stream, torch.cuda.Event,
            torch.cuda.stream, torch.cuda.is_current_stream_capturing)
before = patchable()
from megatron_lora import cpu
active = cpu.enable_cpu()
after = patchable()
print(json.dumps(dict(active=active, cpu_mode=cpu.is_cpu_mode(),
                      unchanged=[a is b for a, b in zip(before, after)],
                      modes=len(_get_current_function_mode_stack()))))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == dict(active=False, cpu_mode=False, unchanged=[True] * 13, modes=0)


@pytest.mark.parametrize("device", CUDA_SPELLINGS, ids=repr)
@pytest.mark.parametrize(
    "factory",
    [
        lambda d: torch.empty(2, 3, device=d),
        lambda d: torch.zeros(4, device=d, dtype=torch.int64),
        lambda d: torch.full((2,), 1.5, device=d),
        lambda d: torch.tensor([1.0, 2.0], device=d),
        lambda d: torch.arange(5, device=d),
        lambda d: torch.randn(3, device=d),
        lambda d: torch.ones(2).new_zeros(3, device=d),
    ],
    ids=["empty", "zeros", "full", "tensor", "arange", "randn", "new_zeros"],
)
def test_factory_calls_with_a_cuda_device_land_on_cpu(factory, device):
    assert factory(device).device == torch.device("cpu")


def test_streams_and_events_are_cpu_stand_ins_that_never_initialise_cuda():
    """megatron-core 0.17+ DDP waits on torch.cuda.current_stream() in every gradient sync; on a
    CUDA build of torch without a driver the real call fails (in a forked rank: "Cannot
    re-initialize CUDA in forked subprocess")."""
    stream = torch.cuda.current_stream()
    assert isinstance(stream, cpu.CpuStream) and torch.cuda.default_stream() is stream
    side = torch.cuda.Stream(device=torch.cuda.current_device())
    event = torch.cuda.Event()
    side.wait_stream(stream)
    stream.wait_event(event)
    stream.record_event(event)
    event.record()
    event.wait()
    assert event.query() and side.query() and not torch.cuda.is_current_stream_capturing()
    with torch.cuda.stream(side):
        x = torch.ones(2, device="cuda") * 2
    assert x.device.type == "cpu" and x.sum().item() == 4
    assert not torch.cuda.is_initialized()


def test_current_device_is_index_zero_and_maps_to_cpu():
    assert torch.cuda.current_device() == 0
    assert torch.empty(1, device=torch.cuda.current_device()).is_cpu


@pytest.mark.parametrize(
    "move",
    [
        lambda t: t.cuda(),
        lambda t: t.cuda(0),
        lambda t: t.cuda(non_blocking=True),
        lambda t: t.to("cuda"),
        lambda t: t.to(torch.device("cuda", 0)),
        lambda t: t.to(0),
        lambda t: t.to(device="cuda:0"),
    ],
    ids=["cuda()", "cuda(0)", "cuda(non_blocking)", "to('cuda')", "to(device)", "to(0)", "to(kw)"],
)
def test_moving_a_tensor_to_cuda_keeps_it_on_cpu(move):
    t = torch.arange(4.0)
    moved = move(t)
    assert moved.is_cpu and torch.equal(moved, t)


def test_to_keeps_dtype_and_other_arguments():
    t = torch.arange(4.0)
    assert t.to("cuda", torch.float16).dtype == torch.float16
    assert t.to(torch.float64).dtype == torch.float64
    assert t.to(t.new_zeros(1, dtype=torch.int32)).dtype == torch.int32


def test_module_cuda_keeps_parameters_on_cpu():
    layer = torch.nn.Linear(3, 2).cuda()
    assert all(p.is_cpu for p in layer.parameters())


class _AllocatesOnCudaInBackward(torch.autograd.Function):
    """Like Megatron's sequence-parallel gathers: backward allocates on the current CUDA device."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2 + torch.zeros(grad.shape, device=torch.cuda.current_device())


@pytest.mark.parametrize(
    "run_backward",
    [
        lambda loss, x: loss.backward(),
        lambda loss, x: torch.autograd.backward(loss),
        lambda loss, x: setattr(x, "grad", torch.autograd.grad(loss, x)[0]),
    ],
    ids=["Tensor.backward", "autograd.backward", "autograd.grad"],
)
def test_backward_pass_runs_under_the_shim(run_backward):
    x = torch.ones(3, requires_grad=True)
    run_backward(_AllocatesOnCudaInBackward.apply(x).sum(), x)
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    assert len(_shim_modes()) == 1, "the mode is back on the stack exactly once"


@pytest.mark.parametrize(
    "dtype, spelling",
    [
        (torch.float32, "torch.cuda.FloatTensor"),
        (torch.float16, "torch.cuda.HalfTensor"),
        (torch.bfloat16, "torch.cuda.BFloat16Tensor"),
        (torch.int64, "torch.cuda.LongTensor"),
    ],
)
def test_tensor_type_uses_the_cuda_spelling(dtype, spelling):
    # Megatron's optimizers accept a parameter only if param.type() == 'torch.cuda.FloatTensor' etc.
    assert torch.zeros(1, dtype=dtype).type() == spelling


def test_tensor_type_conversion_still_converts():
    assert torch.zeros(2).type(torch.float64).dtype == torch.float64


def test_rng_tracker_is_the_cpu_tracker_even_after_a_forced_reset():
    assert isinstance(_seed_tracker(7), cpu.CpuRNGStatesTracker)
    # initialize_rng_tracker(force_reset=True) is what force_reset_rng (>= 0.14) calls; it exists
    # on every supported megatron-core.
    mrandom.initialize_rng_tracker(force_reset=True)
    assert isinstance(mrandom.get_cuda_rng_tracker(), cpu.CpuRNGStatesTracker)


def test_model_parallel_seed_seeds_the_default_generator():
    _seed_tracker(11)
    drawn = torch.rand(4)
    torch.manual_seed(11)
    assert torch.equal(drawn, torch.rand(4))


def test_fork_restores_the_default_generator():
    tracker = _seed_tracker(123)
    before = torch.get_rng_state()
    with tracker.fork():
        torch.rand(8)
    assert torch.equal(torch.get_rng_state(), before)


def test_fork_streams_are_reproducible_and_distinct():
    def draw_all(seed):
        tracker = _seed_tracker(seed)
        draws = {}
        for name in (MODEL_PARALLEL_RNG, mrandom._DATA_PARALLEL_RNG_TRACKER_NAME):
            with tracker.fork(name):
                first = torch.rand(4)
            with tracker.fork(name):  # the named stream advances between forks
                second = torch.rand(4)
            draws[name] = (first, second)
        return draws

    run1, run2 = draw_all(123), draw_all(123)
    flat1 = [t for pair in run1.values() for t in pair]
    flat2 = [t for pair in run2.values() for t in pair]
    assert all(torch.equal(a, b) for a, b in zip(flat1, flat2)), "same seed, same numbers"
    assert all(not torch.equal(a, b) for i, a in enumerate(flat1) for b in flat1[i + 1 :])
    different_seed = draw_all(124)[MODEL_PARALLEL_RNG][0]
    assert not torch.equal(different_seed, run1[MODEL_PARALLEL_RNG][0])


def test_get_and_set_states_replay_a_stream():
    tracker = _seed_tracker(5)
    saved = {name: state.clone() for name, state in tracker.get_states().items()}
    with tracker.fork():
        expected = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(torch.rand(4), expected)
