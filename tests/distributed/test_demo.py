"""The README's main job, shortened: torchrun with 2 gloo ranks must finish and report success."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_runs_at_tp2_and_lora_beats_the_frozen_base():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           os.path.join(ROOT, "scripts", "demo_lora_tp2.py"),
           "--base-steps", "40", "--lora-steps", "40", "--max-files", "30"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    val = next(line for line in lines if line.startswith("validation loss on B"))
    base, lora = float(val.split("frozen base ")[1].split()[0]), float(val.split("LoRA ")[1])
    assert lora < base
    assert any("bitwise identical on all 2 TP ranks: 8/8" in line for line in lines)
    assert lines[-1] == "demo OK"
