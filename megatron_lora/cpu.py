"""Opt-in CPU mode: run Megatron-Core 0.16.1 without CUDA (gloo backend).

Megatron-Core's layers only need ``torch.cuda.current_device()`` and an RNG tracker, but its
training machinery (DDP grad buffers, ``get_megatron_optimizer``, the pipeline schedules and their
p2p, grad clipping) hard-codes ``device="cuda"``, ``.cuda()``, ``torch.cuda.synchronize()`` and
checks such as ``grad.type() == 'torch.cuda.FloatTensor'``. ``enable_cpu()`` makes all of that run
on the CPU of a CUDA-less host, for tests and for the CPU examples. It patches exactly:

1. A :class:`torch.overrides.TorchFunctionMode` (:class:`_CudaToCpuMode`), pushed for the life of
   the process on the calling thread, that
   - rewrites a CUDA ``device=`` keyword (``"cuda"``, ``"cuda:0"``, ``torch.device("cuda")`` or an
     int index such as ``torch.cuda.current_device()``) to ``"cpu"`` in every torch call: weight
     creation in ``tensor_parallel.layers``, DDP's ``_ParamAndGradBuffer``,
     ``FP32Optimizer._scale``, ``clip_grads``, the schedules' ``total_num_tokens``, p2p receive
     buffers, sequence-parallel all-gather / reduce-scatter outputs;
   - rewrites ``Tensor.cuda(...)`` and ``Tensor.to(<cuda device>, ...)`` to the CPU: tied
     embeddings under PP (``LanguageModule.setup_embeddings_and_output_layer``),
     ``tensor_parallel.broadcast_data``, optimizer / grad-scaler state loading;
   - answers ``Tensor.type()`` of a CPU tensor with the ``torch.cuda.`` spelling, because
     ``get_megatron_optimizer``'s param-group builders and ``clip_grads`` reject anything else;
   - stays active during the backward pass (``Tensor.backward``, ``torch.autograd.backward`` /
     ``grad``), where Megatron's sequence-parallel collectives allocate their buffers.
2. ``torch.cuda.current_device`` -> ``0``: used as a ``device=`` argument all over Megatron
   (``tensor_parallel.layers``, rotary embeddings, p2p); the mode above maps index 0 to the CPU.
3. ``torch.cuda.synchronize`` -> no-op: called by p2p (``_communicate``) after batched
   send/recv and by ``parallel_state``; on CPU every op is already synchronous.
4. ``torch.cuda.manual_seed`` -> ``torch.manual_seed``: ``model_parallel_cuda_manual_seed``
   seeds the "default" stream of random numbers with it, and on CPU that stream is the CPU
   generator that dropout and init use outside a tracker fork.
5. Megatron's RNG tracker class is replaced by :class:`CpuRNGStatesTracker`, whose named states
   are CPU generator states, so ``model_parallel_cuda_manual_seed`` and
   ``get_cuda_rng_tracker().fork()`` (weight init of sharded layers, dropout in TP regions) work.
6. ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` -> the CPU
   generator's state: activation recomputation (``CheckpointFunction``, ``recompute_granularity``)
   saves and replays the "CUDA" RNG state with them so recomputed dropout masks match.
7. CUDA streams and events -> :class:`CpuStream` / :class:`CpuEvent`, whose waits and records do
   nothing (every CPU op is already complete when it returns): ``torch.cuda.current_stream``,
   ``default_stream``, ``Stream``, ``Event``, ``stream(...)`` and ``is_current_stream_capturing``.
   From megatron-core 0.17 DDP's gradient sync waits on ``torch.cuda.current_stream()`` on every
   step. On a CUDA build of torch without a driver (the only torch the index serves for Python
   3.12) each of these would initialise CUDA, which fails, and in a forked rank fails with
   "Cannot re-initialize CUDA in forked subprocess"; nothing patched here ever initialises CUDA.

8. Megatron's mixture-of-experts layer (``enable_moe_on_cpu``, applied by ``enable_cpu``):
   - ``moe_utils.te_general_gemm`` is defined as ``None`` where Transformer Engine failed to
     import: megatron-core 0.16 leaves the name undefined and every router forward then raises
     ``NameError``; ``None`` selects its own torch GEMM, as on a CUDA host without TE.
   - ``token_dispatcher.maybe_move_tensor_to_cpu``: on CUDA the all-to-all dispatcher turns its
     split sizes into host arrays here; a tensor already on the CPU was passed on as a tensor,
     which ``all_to_all_single`` rejects. It now becomes the same host array.
   - ``mappings._gather_along_first_dim`` with uneven ``output_split_sizes`` (the dispatcher at
     expert-TP > 1 with EP > 1): gloo refuses an uneven ``all_gather``, so each rank's rows are
     padded to the longest and gathered with one ``all_gather_into_tensor``, then unpadded. One
     call, as on NCCL; its bytes are the padded ones.

9. Megatron's selective recompute of outputs it discards (``recompute_modules=["layernorm"]``,
   ``CheckpointWithoutOutput``; ``enable_output_recompute_on_cpu``, applied by ``enable_cpu``):
   - ``CheckpointWithoutOutput`` always takes its fp8 branch (its ``fp8 is not None`` is True for
     the default ``fp8=False``), which calls Transformer Engine's ``FP8GlobalStateManager``,
     ``fp8_autocast`` and ``activation_recompute_forward``; without TE they are undefined
     (``NameError``). They become "fp8 is off" and contexts that do nothing, which is what TE
     answers when fp8 is off.
   - megatron-core 0.19 refills the discarded output by compiling a C++ extension
     (``_get_share_storage``) on the first backward: a compiler and tens of seconds in every fresh
     rank. On CPU the recomputed bytes are copied into the freed storage instead, as 0.16 does:
     the same values in the same tensor.

``torch.cuda.is_available()`` stays ``False``: Megatron-Core does not need it on these paths, and a
lying ``is_available`` would send torch itself (autocast, pin_memory, streams) down CUDA paths.
Works with either torch build on a host without a GPU: the CPU-only build, or a CUDA build where
no driver is found. Not covered: CUDA graphs, the combined 1F1B / fine-grained offloading
schedules, fused kernels and Transformer Engine; keep those options off on CPU
(``overlap_grad_reduce`` / ``overlap_param_gather`` do work).

``enable_cpu()`` is idempotent and a strict no-op on a host where CUDA is available.
"""

import contextlib

import torch
from megatron.core.tensor_parallel import random as mrandom
from torch.overrides import TorchFunctionMode, redispatch_function

__all__ = ["CpuEvent", "CpuRNGStatesTracker", "CpuStream", "enable_cpu", "is_cpu_mode"]

_MODE = None  # the pushed _CudaToCpuMode, once enable_cpu() has run on a CUDA-less host
_AUTOGRAD_ENTRY_POINTS = (torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad)


def _is_cuda_device(device):
    """True for the spellings of a CUDA device Megatron passes: str, torch.device or int index."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int in a device position means a CUDA ordinal (bool is an int, never a device).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Sends CUDA tensor placements to the CPU and reports CPU tensors as ``torch.cuda.*Tensor``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            # Tensor.cuda(device=None, non_blocking=False, memory_format=...): keep only the flags
            # that Tensor.to understands.
            kwargs.pop("device", None)
            return args[0].to("cpu", **kwargs)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func in _AUTOGRAD_ENTRY_POINTS:
            # torch pops a mode while its handler runs, and the autograd engine runs the whole
            # backward pass with the thread state of its caller: a plain func(...) here would run
            # every backward function unpatched (Megatron's sequence-parallel all-gathers allocate
            # on torch.cuda.current_device() in backward). Re-enter the mode and skip just this
            # one dispatch. Other functions are called plainly: not every C++ binding honours the
            # skip (torch._C._set_grad_enabled would recurse forever).
            with self:
                return redispatch_function(func, types, args, kwargs)
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # 'torch.FloatTensor' -> 'torch.cuda.FloatTensor' (Megatron's optimizer dtype checks).
            result = result.replace("torch.", "torch.cuda.", 1) if args[0].is_cpu else result
        return result


class CpuEvent:
    """A CUDA event on the CPU: every op is complete when it returns, so it is always reached."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def synchronize(self):
        pass


class CpuStream(contextlib.nullcontext):
    """A CUDA stream on the CPU: ops run in program order, so every wait is already satisfied."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else CpuEvent()

    def query(self):
        return True

    def synchronize(self):
        pass


_CPU_STREAM = CpuStream()


class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
    """Megatron's ``CudaRNGStatesTracker`` with named CPU generator states.

    ``add`` seeds a private generator (the default generator is untouched); ``fork`` swaps the
    named state into the default CPU generator, runs the block, saves the advanced state back and
    restores the caller's state, so forks are reproducible and leave the default stream exactly
    where it was. ``get_states`` / ``set_states`` are inherited: they copy the dict of states, which
    here holds CPU ``ByteTensor`` states.
    """

    def add(self, name, seed):
        """Track a new named state seeded with ``seed`` (both must be new, as in Megatron)."""
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"cpu rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Run the block on the named state, then restore the caller's CPU generator state."""
        if name not in self.states_:
            raise Exception(f"cpu rng state {name} is not added")
        outer_state = torch.get_rng_state()
        # _current_state_name exists from megatron-core 0.14; keeping it is harmless before.
        outer_name = getattr(self, "_current_state_name", None)
        self._current_state_name = name
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            self._current_state_name = outer_name
            torch.set_rng_state(outer_state)


def is_cpu_mode():
    """True once :func:`enable_cpu` has activated the shim in this process."""
    return _MODE is not None


def enable_cpu():
    """Activate CPU mode for Megatron-Core (see the module docstring for every patch).

    Call it first, before building models or calling ``model_parallel_cuda_manual_seed``: it
    replaces Megatron's RNG tracker, dropping any state seeded into the old one.

    Returns:
        bool: True if the shim is active; False on a host with CUDA, where nothing is patched.
    """
    global _MODE
    if torch.cuda.is_available():
        return False
    if _MODE is not None:
        return True
    # get_cuda_rng_tracker() / model_parallel_cuda_manual_seed(): initialize_rng_tracker() builds
    # its tracker from this module global, so every (re)built tracker, also with
    # force_reset_rng=True, is a CPU one; force_reset drops a CUDA one built earlier.
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom.initialize_rng_tracker(force_reset=True)
    # CheckpointFunction (activation recomputation) saves / replays the "CUDA" RNG state.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    # device=torch.cuda.current_device() everywhere (layers, DDP buffers, p2p); 0 maps to CPU.
    torch.cuda.current_device = lambda: 0
    # p2p_communication._communicate (batch_p2p_sync) and parallel_state call it; CPU is in sync.
    torch.cuda.synchronize = lambda device=None: None
    # model_parallel_cuda_manual_seed seeds the default stream, which is the CPU generator here.
    torch.cuda.manual_seed = torch.manual_seed
    # Streams and events (DDP's grad sync from megatron-core 0.17, overlapped communication).
    torch.cuda.current_stream = torch.cuda.default_stream = lambda device=None: _CPU_STREAM
    torch.cuda.Stream, torch.cuda.Event = CpuStream, CpuEvent
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext(stream)
    torch.cuda.is_current_stream_capturing = lambda: False
    # Factory devices, Tensor.cuda / .to, Tensor.type() (optimizers, clip_grads), backward.
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # pushed for the life of the process, never popped
    enable_moe_on_cpu()
    enable_output_recompute_on_cpu()
    return True


class _FP8Off:
    """Transformer Engine's ``FP8GlobalStateManager`` as it answers when fp8 is off."""

    @staticmethod
    def is_fp8_enabled():
        return False

    @staticmethod
    def get_fp8_recipe():
        return None


def _copy_storage(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Refill ``dst``'s freed storage with ``src``'s bytes (0.16's ``_recompute`` does this)."""
    with torch.no_grad():
        dst.untyped_storage().resize_(src.untyped_storage().nbytes())
        dst.untyped_storage().copy_(src.untyped_storage())


def enable_output_recompute_on_cpu():
    """Megatron's ``CheckpointWithoutOutput`` on the CPU (module docstring, item 9)."""
    if not hasattr(mrandom, "FP8GlobalStateManager"):
        mrandom.FP8GlobalStateManager = _FP8Off
        mrandom.fp8_autocast = lambda *args, **kwargs: contextlib.nullcontext()
        mrandom.activation_recompute_forward = lambda *args, **kwargs: contextlib.nullcontext()
    if hasattr(mrandom, "_get_share_storage"):
        mrandom._get_share_storage = lambda: _copy_storage


def enable_moe_on_cpu():
    """Megatron's MoE token dispatchers and router on the CPU (module docstring, item 8)."""
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    token_dispatcher.maybe_move_tensor_to_cpu = _split_sizes_to_host
    if not getattr(mappings._gather_along_first_dim, "_lora_cpu", False):
        mappings._gather_along_first_dim = _uneven_gather_on_gloo(mappings._gather_along_first_dim)


def _split_sizes_to_host(tensor, as_numpy=False, record_stream=False):
    """``maybe_move_tensor_to_cpu`` for a tensor already on the CPU: the host array on request."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _uneven_gather_on_gloo(gather):
    """Megatron's ``_gather_along_first_dim`` whose uneven case runs as one padded all-gather."""

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = input_.new_empty((longest * len(sizes),) + tuple(input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(out, padded, group=group)
        return torch.cat([out[i * longest: i * longest + n] for i, n in enumerate(sizes)])

    gather_along_first_dim._lora_cpu = True
    return gather_along_first_dim
