"""Crash safety and signals through the script's own launcher (no Slurm needed).

- A rank SIGKILLed mid-run (after a periodic save) fails the job, leaves the last complete
  checkpoint loadable, and a relaunch with --load resumes from it onto the uninterrupted losses.
- SIGTERM sent to the launcher reaches the ranks; with --exit-signal-handler they finish the
  iteration, save, and the job exits 0 with the reason logged and recorded in metrics.json.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests import REPO_ROOT
from tests.distributed import script_runs as S

# The launch path does not depend on the megatron-core version: run it in one pass of test.sh.
pytestmark = pytest.mark.once

ITERS = 30
TRAIN = [*S.TRAIN_FLAGS, "--train-iters", str(ITERS), "--tensor-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fault_tolerance")
    S.make_dataset(str(directory))
    return directory


def flags(workdir, *extra):
    return [*S.MODEL_FLAGS, *TRAIN, *S.LORA_FLAGS, "--data-path", str(workdir / "corpus"), *map(str, extra)]


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    return S.losses(S.run_script(flags(workdir), nproc=2).stdout)


def start(workdir, name, *extra):
    """The launcher in the background, its output in ``name.log``; returns (process, log path)."""
    log = workdir / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, S.SCRIPT, "--nproc-per-node", "2", *flags(workdir, *extra)],
                                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, **{RUN_MARKER: f"{name}-{os.getpid()}"}))
    return proc, log


RUN_MARKER = "MEGATRON_LORA_TEST_RUN"  # inherited by the ranks and whatever they start


def survivors(name):
    """Processes of the run ``name`` still alive after its launcher exited (after 5 s of grace)."""
    marker = f"{name}-{os.getpid()}".encode()
    deadline = time.time() + 5
    while True:
        alive = []
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            try:
                if environ(pid).get(RUN_MARKER.encode()) == marker:
                    alive.append(pid)
            except OSError:  # gone, or not ours to read
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


def environ(pid):
    """A process's environment, as bytes."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)


def wait_for(proc, log, pattern, timeout=180):
    deadline = time.time() + timeout
    while not re.search(pattern, log.read_text(), re.M):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"never saw {pattern!r} (exit {proc.poll()}):\n{log.read_text()}")
        time.sleep(0.02)


def rank_pids(launcher_pid):
    """{rank: pid} of the launcher's children, read from their environment."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    return {int(environ(pid)[b"RANK"]): pid for pid in children}


def test_sigkilled_rank_leaves_last_checkpoint_and_relaunch_reproduces_losses(workdir, uninterrupted):
    from megatron_lora.core.checkpoint.adapter import latest_iteration

    save = workdir / "killed"
    proc, log = start(workdir, "killed", "--save", save, "--save-interval", 2)
    try:
        # killed after a periodic save, while the next iterations run
        wait_for(proc, log, r"^saved checkpoint at iteration 4 ")
        os.kill(rank_pids(proc.pid)[1], signal.SIGKILL)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code != 0, text
    assert survivors("killed") == []  # nothing the dead rank started outlives the job
    last = latest_iteration(str(save))
    assert last is not None and 4 <= last < ITERS, (last, text)
    assert not (save / "adapter.safetensors").exists()  # the run never finished

    resumed = S.run_script(flags(workdir, "--save", save, "--load", save), nproc=2)
    assert f"resumed from {save} at iteration {last}" in resumed.stdout
    got = S.losses(resumed.stdout)
    assert sorted(got) == list(range(last + 1, ITERS + 1)), resumed.stdout
    assert got == {i: uninterrupted[i] for i in got}  # bitwise
    assert latest_iteration(str(save)) == ITERS


def test_sigterm_to_launcher_saves_and_exits_cleanly(workdir, uninterrupted):
    save = workdir / "terminated"
    proc, log = start(workdir, "terminated", "--save", save, "--exit-signal-handler")
    try:
        wait_for(proc, log, r"^iteration\s+3/")
        proc.send_signal(signal.SIGTERM)  # the launcher passes it on to both ranks
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 0, text
    stopped = int(re.search(r"exiting at iteration (\d+): SIGTERM received", text).group(1))
    assert 3 <= stopped < ITERS and (save / "latest_adapter_iteration.txt").read_text() == str(stopped)
    assert S.losses(text) == {i: uninterrupted[i] for i in range(1, stopped + 1)}
    metrics = json.loads((save / "metrics.json").read_text())
    assert metrics["exit_reason"] == "signal" and metrics["iteration"] == stopped
