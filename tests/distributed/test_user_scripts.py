"""A user's own script under torchrun: saving an adapter never hangs and leaves no process behind.

The script has no ``if __name__ == "__main__":`` guard, as the README's usage snippet and many
user scripts do not. Megatron's dist-checkpoint writer used to start a *spawn* results server on
the first save, which re-ran such a script and blocked forever, and outlived a killed rank.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests import REPO_ROOT
from tests.distributed.test_fault_tolerance import RUN_MARKER, survivors

pytestmark = pytest.mark.once  # the launch path does not depend on the megatron-core version

USER_SCRIPT = """
import os, sys, time
import torch.distributed as dist
from megatron_lora.cpu import enable_cpu
enable_cpu()
dist.init_process_group("gloo")
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
parallel_state.initialize_model_parallel()
model_parallel_cuda_manual_seed(0)
from megatron_lora import LoRAConfig, apply_lora, save_adapter
from tests.distributed.models import build_tiny_gpt, tiny_gpt_config
model = apply_lora(build_tiny_gpt(tiny_gpt_config()), LoRAConfig(rank=4))
save_adapter(model, os.environ["SAVE_DIR"], iteration=1)
print("saved", flush=True)
if os.environ.get("THEN_WAIT"):
    time.sleep(600)
dist.destroy_process_group()
"""


def _torchrun(tmp_path, name, **env):
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, SAVE_DIR=str(tmp_path / "adapter"),
               **{RUN_MARKER: f"{name}-{os.getpid()}"}, **env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(script)]
    return subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _stop(proc):
    """Kill torchrun and everything in its session (a hung run must not outlive the test)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_script_without_main_guard_saves_an_adapter_under_torchrun(tmp_path):
    proc = _torchrun(tmp_path, "user_no_guard")
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        _stop(proc)
        pytest.fail("save_adapter hung in a script without an `if __name__ == '__main__':` guard")
    assert proc.returncode == 0 and "saved" in out, out
    assert (tmp_path / "adapter" / "latest_adapter_iteration.txt").read_text() == "1"
    assert survivors("user_no_guard") == []


def test_nothing_the_save_started_outlives_a_killed_rank(tmp_path):
    proc = _torchrun(tmp_path, "user_killed", THEN_WAIT="1")
    try:
        deadline = time.time() + 180
        while not (tmp_path / "adapter" / "latest_adapter_iteration.txt").exists():
            assert proc.poll() is None and time.time() < deadline, "the rank never finished its save"
            time.sleep(0.2)
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            (rank,) = map(int, f.read().split())  # torchrun's one worker
        os.kill(rank, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            _stop(proc)
    alive = survivors("user_killed")
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == [], "processes of the killed rank outlived it"
