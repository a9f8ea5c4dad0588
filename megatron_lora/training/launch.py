"""Starting ranks: under torchrun / srun, or N local ranks started by the script itself.

``python scripts/pretrain_gpt_lora.py --nproc-per-node 2 ...`` checks its flags once, in this
process, then starts two ranks with the environment torchrun would give them (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). When one rank fails the others are stopped, and the ranks'
error messages are printed once each, as one line: a bad checkpoint gives one line, not one
traceback per rank (torchrun adds its own multi-line failure report, which this path avoids).
SIGTERM / SIGUSR1 / SIGUSR2 sent to the launcher are passed on to every rank (see
``megatron_lora.training.preemption``); a rank killed outright (SIGKILL) fails the job like any failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import List

ERROR_DIR_ENV = "MEGATRON_LORA_ERROR_DIR"
GRACE_SECONDS = 10.0  # how long the other ranks may take to fail on their own after one did


def launched() -> bool:
    """True when a launcher (torchrun, srun wrapper, this module) started this process as a rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env() -> None:
    """The environment of a 1-rank job, so ``init_process_group`` works without a launcher."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def report_error(message: str) -> None:
    """Hand a rank's one-line error to the local launcher, or print it (torchrun / 1 rank)."""
    directory = os.environ.get(ERROR_DIR_ENV)
    if directory:
        with open(os.path.join(directory, f"rank{rank()}.txt"), "w", encoding="utf-8") as f:
            f.write(message)
    else:
        prefix = f"[rank {rank()}] " if world_size() > 1 else ""
        print(f"error: {prefix}{message}", file=sys.stderr, flush=True)


def run_local_ranks(nproc: int, script: str, argv: List[str]) -> int:
    """Run ``script argv`` as ``nproc`` local ranks; returns the job's exit code."""
    port = _free_port()
    # torchrun's default: one intra-op thread per rank, or N ranks x all cores threads spin
    # against each other (a 2-rank CPU job runs ~50x slower).
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="megatron_lora_errors_") as errors:
        procs = []
        for r in range(nproc):
            env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc),
                       LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS=threads, **{ERROR_DIR_ENV: errors})
            # Each rank leads its own session, as under torchrun, so that what a rank started
            # (Megatron's checkpoint-writer manager) can be stopped with it: a rank killed
            # outright would otherwise leave it running forever.
            procs.append(subprocess.Popen([sys.executable, script, *argv], env=env, start_new_session=True))
        try:
            with _forwarding_signals(procs):
                code = _wait(procs)
        finally:
            for p in procs:
                kill_process_group(p.pid)
        messages = []
        for r in range(nproc):
            path = os.path.join(errors, f"rank{r}.txt")
            if os.path.exists(path):
                text = open(path, encoding="utf-8").read().strip()
                if text not in messages:
                    messages.append(text)
        for text in messages:
            print(f"error: {text}", file=sys.stderr, flush=True)
    return code


# What a scheduler sends before it stops a job (Slurm: scancel --signal, --signal=SIG@SECONDS,
# the SIGTERM of a cancel or time limit). The ranks decide what a signal means
# (--exit-signal-handler: save and exit 0); the launcher only passes it on and keeps waiting, so
# a rank that is still saving is not orphaned or cut short.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@contextlib.contextmanager
def _forwarding_signals(procs):
    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(procs) -> int:
    """Wait for all ranks; once one fails, give the rest a grace period, then stop them."""
    failed_at = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = time.time()
            if failed_at is not None and time.time() - failed_at > GRACE_SECONDS:
                _stop(procs)
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(procs, signal.SIGINT)
        raise
    nonzero = [c for c in (p.returncode for p in procs) if c != 0]
    return nonzero[0] if nonzero else 0


def kill_process_group(leader_pid: int) -> None:
    """Kill what is left of a rank's process group or session (the processes it started)."""
    try:
        os.killpg(leader_pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left, or the rank never led a group
        pass


def _stop(procs, sig=signal.SIGTERM) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.time() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
