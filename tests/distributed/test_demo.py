"""The README's main job, shortened: the same bash script, fewer iterations and stdlib files."""

import json
import os
import subprocess

import pytest

from tests import REPO_ROOT

# The same training path runs per version in test_pretrain_script.py; the demo runs in one pass.
pytestmark = pytest.mark.once



def test_demo_pretrains_then_lora_at_tp2_beats_the_frozen_base(tmp_path):
    env = {**os.environ, "DEMO_PYTHON_READY": "1", "DEMO_DIR": str(tmp_path / "demo"),
           "BASE_ITERS": "40", "LORA_ITERS": "40", "MAX_FILES": "30"}
    done = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "demo.sh")], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any("replicated LoRA factors bitwise identical across TP ranks: 8/8" in line for line in lines)
    assert lines[-1].startswith("demo OK")
    valid = json.loads((tmp_path / "demo" / "lora" / "metrics.json").read_text())["valid"]
    assert valid["final"] < valid["base"]
    # the adapter (and only the adapter) was saved
    assert (tmp_path / "demo" / "lora" / "adapter.safetensors").exists()
    assert (tmp_path / "demo" / "lora" / "latest_adapter_iteration.txt").read_text() == "40"


def test_moe_demo_pretrains_at_ep1_then_lora_at_ep2_beats_the_frozen_base(tmp_path):
    """``bash scripts/demo.sh --num-experts 4``: the same job on a mixture of 4 experts (top-2),
    the base at EP=1, LoRA on attention and every expert at EP=2 (all-to-all)."""
    env = {**os.environ, "DEMO_PYTHON_READY": "1", "DEMO_DIR": str(tmp_path / "demo")}
    done = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "demo.sh"), "--num-experts", "4"], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any("experts ETP 1 x EP 1 x expert-DP 1 (4 experts, top-2, allgather)" in line for line in lines)
    assert any("experts ETP 1 x EP 2 x expert-DP 1 (4 experts, top-2, alltoall)" in line for line in lines)
    assert lines[-1].startswith("demo OK")
    valid = json.loads((tmp_path / "demo" / "lora" / "metrics.json").read_text())["valid"]
    assert valid["final"] < valid["base"]
    assert (tmp_path / "demo" / "lora" / "latest_adapter_iteration.txt").read_text() == "40"
    assert (tmp_path / "demo" / "lora" / "adapter.safetensors").exists()  # gathered over the EP ranks
