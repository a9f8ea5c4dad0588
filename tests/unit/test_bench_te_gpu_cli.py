"""``benchmarks/bench_te_lora_gpu.py`` without a GPU: exit status 2 and one clear line, no traceback.

The benchmark runs in a subprocess with ``CUDA_VISIBLE_DEVICES=""``, so on a CUDA host too it sees
no GPU and takes the same path as on a CPU-only machine.
"""

import os
import subprocess
import sys

from tests import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "bench_te_lora_gpu.py")
EXPECTED = ("error: bench_te_lora_gpu.py needs a CUDA GPU (and Transformer Engine for the TE rows); "
            "none found.")


def test_without_cuda_exits_2_with_one_error_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, SCRIPT, "--iters", "1"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.splitlines() == [EXPECTED], out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stdout == ""
