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
