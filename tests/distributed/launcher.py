"""The one helper every distributed test uses: run a function on N real gloo processes.

    from tests.distributed.launcher import run_distributed
    losses = run_distributed(train_two_steps, 2, lr, tp=2)   # -> [rank0_result, rank1_result]

Each rank is a fresh process that enables ``megatron_lora.cpu`` (Megatron-Core on CPU), joins a
gloo process group on 127.0.0.1, initialises Megatron's model parallel state, seeds Megatron's RNG
tracker and torch, calls ``fn(*args)`` and tears everything down again. ``fn`` must be a
module-level function (it is pickled by reference into the rank), and its result must be
picklable; tensors in it are detached and copied so that they travel by value.

Ranks are started by multiprocessing's ``forkserver``: a clean interpreter (spawned once per
test session, never a fork of the pytest process and its threads) that imports torch and
Megatron-Core once and forks each rank from that state. A rank then starts in well under a second
instead of re-importing Megatron-Core (~8 s of CPU on a 2-core host) for every rank of every test.

Failures are loud and never leave processes behind: an exception on any rank becomes a
``RuntimeError`` in the caller naming the rank and carrying the child's traceback; a rank that dies
silently or a run that exceeds ``timeout`` seconds raises too; all children are killed on exit.
Ranks are not daemonic, so ``fn`` may start processes of its own (Megatron's checkpoint writer does).
Each rank leads its own process group, and on exit the launcher kills every rank's whole group,
whatever happened: a writer whose rank was killed mid-save (the crash tests) dies with it instead
of waiting forever on its dead parent.
"""

import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.multiprocessing as mp
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_lora.cpu import enable_cpu
from megatron_lora.training.launch import kill_process_group

_POLL_S = 0.1  # how often the parent checks for dead ranks and the deadline
_GRACE_S = 2.0  # how long a rank may take to deliver its last message or to exit after it
# Imported once by the forkserver; every rank inherits them. A module that fails to import here is
# skipped silently by multiprocessing and imported (and fails loudly) in the rank instead.
_PRELOAD = [
    "megatron_lora.cpu",
    "megatron.core.distributed",
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.pipeline_parallel",
    "tests.distributed.launcher",
    "tests.distributed.models",
]


def run_distributed(fn, world_size, *args, tp=1, pp=1, seed=1234, timeout=240, te_double=False, fresh=False,
                    **init_kwargs):
    """Run ``fn(*args)`` on ``world_size`` gloo ranks and return the results in rank order.

    Args:
        fn: module-level function run on every rank after the model-parallel setup.
        world_size: number of processes; must be a multiple of ``tp * pp``.
        *args: positional arguments for ``fn`` (picklable).
        tp: ``tensor_model_parallel_size`` for ``parallel_state.initialize_model_parallel``.
        pp: ``pipeline_model_parallel_size`` for ``parallel_state.initialize_model_parallel``.
        seed: seed for ``model_parallel_cuda_manual_seed`` and ``torch.manual_seed``.
        timeout: seconds the whole run may take before every rank is killed.
        te_double: run with ``tests/te_double.py`` as ``transformer_engine`` (Megatron's TE spec on
            CPU). Such ranks are spawned fresh, not forked from the forkserver, whose Megatron
            already settled on "no TE"; each pays the Megatron import (~8 s of CPU).
        fresh: spawn fresh ranks too, for an environment variable that is read at import (the
            forkserver imported Megatron, and with it triton, under the environment of its start).
        **init_kwargs: further keyword arguments for ``initialize_model_parallel``.

    Returns:
        list: ``fn``'s return value of each rank, index = global rank.

    Raises:
        RuntimeError: a rank raised (message has the rank and its traceback) or died silently.
        TimeoutError: the ranks did not all finish within ``timeout`` seconds.
    """
    if "<" in getattr(fn, "__qualname__", "<"):
        raise ValueError(
            f"run_distributed needs a module-level function, got {fn!r}; lambdas and nested "
            "functions cannot be pickled into the ranks. Move it to module level."
        )
    if world_size % (tp * pp):
        raise ValueError(f"world_size={world_size} is not a multiple of tp*pp={tp * pp}")

    if te_double:
        from tests import te_double as double

        # The rank body, fn and args travel as bytes: unpickling them imports Megatron (and this
        # module), which must come after the double is installed in the fresh rank.
        ctx, target = mp.get_context("spawn"), double.rank_main
        call = (pickle.dumps((_rank_main, fn, args)),)
    elif fresh:
        ctx, target, call = mp.get_context("spawn"), _rank_main, (fn, args)
    else:
        ctx, target, call = mp.get_context("forkserver"), _rank_main, (fn, args)
        ctx.set_forkserver_preload(_PRELOAD)  # no effect once the server runs, so safe to repeat
    results_q = ctx.Queue()
    setup = dict(
        world_size=world_size, port=_free_port(), tp=tp, pp=pp, seed=seed, timeout=timeout,
        init_kwargs=init_kwargs, environ=dict(os.environ),
    )
    procs = [
        ctx.Process(target=target, args=(rank, setup, *call, results_q), daemon=False)
        for rank in range(world_size)
    ]
    results = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(results) < world_size:
            rank, ok, payload = _next_message(results_q, procs, results, deadline, timeout)
            if not ok:
                raise RuntimeError(f"{fn.__qualname__} failed on rank {rank}:\n{payload}")
            results[rank] = pickle.loads(payload)
        for p in procs:  # every rank has torn down and reported; let it exit before the kill
            p.join(timeout=_GRACE_S)
    finally:
        for p in procs:
            if p.pid is None:  # start() failed before this rank was launched
                continue
            if p.is_alive():
                p.kill()
            p.join()
            kill_process_group(p.pid)
        results_q.close()
    return [results[rank] for rank in range(world_size)]


def _free_port():
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _next_message(results_q, procs, results, deadline, timeout):
    """The next (rank, ok, payload) report; raises if a rank died silently or time is up.

    A rank that exits right after reporting may still have its message in the pipe, so an exited
    rank gets a grace period to deliver it before it counts as silent.
    """
    while True:
        try:
            return results_q.get(timeout=_POLL_S)
        except queue.Empty:
            pass
        silent = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
        if silent:
            try:
                return results_q.get(timeout=_GRACE_S)
            except queue.Empty:
                raise RuntimeError(
                    f"rank {silent[0]} exited with code {procs[silent[0]].exitcode} without "
                    "reporting a result (killed, crashed, or called sys.exit); see its stderr"
                ) from None
        if time.monotonic() > deadline:
            missing = [r for r in range(len(procs)) if r not in results]
            raise TimeoutError(
                f"ranks {missing} did not finish within timeout={timeout}s (a hang, e.g. a "
                "collective that not every rank reaches); all ranks were killed"
            )


def _detached(obj):
    """``obj`` with every tensor detached and copied (a view would pickle its whole storage)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj


def _rank_main(rank, setup, fn, args, results_q):
    """Body of one rank: set up, run ``fn``, tear down, report."""
    os.setpgrp()  # the rank's own process group: the launcher kills it whole on exit
    os.environ.update(setup["environ"])  # the forkserver holds the env of its start, not today's
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(setup["port"]),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(setup["world_size"]),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        enable_cpu()
        torch.distributed.init_process_group(
            "gloo",
            rank=rank,
            world_size=setup["world_size"],
            timeout=timedelta(seconds=setup["timeout"]),
        )
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=setup["tp"],
            pipeline_model_parallel_size=setup["pp"],
            **setup["init_kwargs"],
        )
        model_parallel_cuda_manual_seed(setup["seed"])
        torch.manual_seed(setup["seed"])
        payload = pickle.dumps(_detached(fn(*args)))
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001 - everything, incl. KeyboardInterrupt, goes to the parent
        results_q.put((rank, False, traceback.format_exc()))
    else:
        results_q.put((rank, True, payload))
    # Make sure the message is flushed to the pipe before the process exits.
    results_q.close()
    results_q.join_thread()
